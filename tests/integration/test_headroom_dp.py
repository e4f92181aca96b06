"""The fp16 headroom probe on the local shard (issue 20): each data-parallel rank runs its own rows and
the ranks all-reduce (MAX of each layer's absmax, SUM of the non-finite counts), so every rank
returns the dict the single-process whole-batch probe gives, bitwise.

Two torchrun workers on gloo: the torch backend (FSDP2, DP 2) and the megatron backend (TP 1, DP 2,
CPU redirects as in test_megatron_pipeline.py); the references run single-process in the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "unit" / "policy"  # conftest.py: synthetic_batch, cpu_redirects, free_port
MEGATRON = HERE / "megatron"  # test_policy.py: DENSE, _weights
VOCAB = 48
TORCH_CFG = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
                        "max_position_embeddings": 64, "tie_word_embeddings": False}}


def _batch():
    from conftest import synthetic_batch

    # 8 rows in micro-batches of 2: each rank's 4 rows make the same micro-batches as the whole batch's
    return synthetic_batch(VOCAB, 8, 5, 7, seed=3)


def _torch_headroom():
    from nemo_rl_fp16.policy import TorchPolicy
    from nemo_rl_fp16.precision import PrecisionPolicy

    tr = TorchPolicy(TORCH_CFG, PrecisionPolicy.from_name("fp16"), lr=1e-3, micro_batch_size=2, seed=0)
    return tr.activation_headroom(_batch())


def _megatron_headroom():
    from test_policy import DENSE, _weights

    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.precision import PrecisionPolicy

    _, sd = _weights(DENSE)
    tr = MegatronPolicy(DENSE, PrecisionPolicy.from_name("fp16"), lr=1e-3, micro_batch_size=2, initial_state_dict=sd)
    return tr.activation_headroom(_batch())


def test_headroom_on_local_shards_equals_the_whole_batch(tmp_path):
    import torch

    sys.path[:0] = [str(HERE), str(MEGATRON)]
    from conftest import torchrun

    ref = {"torch": _torch_headroom()}
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        pass
    else:
        from conftest import cpu_redirects, reset_megatron

        with cpu_redirects():
            reset_megatron()
            ref["megatron"] = _megatron_headroom()
            reset_megatron()
    assert ref["torch"]["range/act_nonfinite"] == 0 and "range/act_absmax/layer1" in ref["torch"]
    torch.save(ref, tmp_path / "ref.pt")
    out = torchrun(Path(__file__), timeout=600, HEADROOM_REF=str(tmp_path / "ref.pt"))
    for backend in ref:
        assert f"rank0 {backend} headroom OK" in out and f"rank1 {backend} headroom OK" in out, out[-4000:]


def _worker() -> None:  # pragma: no cover - runs under torchrun
    sys.path[:0] = [str(HERE), str(MEGATRON)]
    import torch
    import torch.distributed as dist

    import nemo_rl_fp16.policy.micro_batches as mb

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref = torch.load(os.environ["HEADROOM_REF"], weights_only=False)
    ran = []  # the rows each probe forward ran on this rank: its own share only
    real = mb.MicroBatchLoop.slices

    def spy(self, n, local=False):
        for s in real(self, n, local):
            ran.append((s.start, s.stop))
            yield s

    mb.MicroBatchLoop.slices = spy
    for backend in ref:
        ran.clear()
        if backend == "torch":
            got = _torch_headroom()
        else:
            from conftest import cpu_redirects, reset_megatron

            with cpu_redirects():
                got = _megatron_headroom()
                reset_megatron()
        assert ran == [(4 * rank, 4 * rank + 2), (4 * rank + 2, 4 * rank + 4)], (backend, ran)
        assert got == ref[backend], (backend, got, ref[backend])  # bitwise, every key, on every rank
        print(f"rank{rank} {backend} headroom OK", flush=True)


if __name__ == "__main__":
    _worker()
