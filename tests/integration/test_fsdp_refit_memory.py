"""Trainer side of the refit on the torch backend: FSDP2 DP=2 (2 processes, gloo, one torchrun launch).

`TorchPolicy.rollout_stream(0)` (`policy/torch_refit_stream.py`) gathers one parameter at a time to
rank 0 only. Each rank measures its peak resident memory while the stream is packed into fp16
buckets (`rollout.refit.iter_buckets`, each hashed by a stand-in consumer, as in
`test_megatron_refit_memory.py`), and asserts the issue-19 bound: rank 0 holds about one parameter
(its gathered shards and the whole tensor) plus one bucket beyond its shard, never the model; rank 1
holds at most a padded copy of its shard of one parameter. The full-state refit
(`rollout_state_dict`, `get_model_state_dict(full_state_dict=True)`) is measured the same way and
must exceed the model on rank 0, so the measurement can tell them apart. The streamed weights equal
the full-state refit bitwise (fp32 before the cast; the vocabulary is odd, so the embedding's shards
are uneven), for untied and tied embeddings, after a scoring pass and a train step (FSDP2's
forward/backward leave the parameters as they find them: the stream reads the sharded master).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "unit" / "policy"  # conftest.py: free_port
MIB = 2**20
CASES = ("untied", "tied")


def test_fsdp_refit_stream_bitwise_and_bounded(tmp_path):
    sys.path.insert(0, str(HERE))
    from conftest import torchrun

    out = torchrun(Path(__file__), timeout=600, MALLOC_MMAP_THRESHOLD_="65536")
    for case in CASES:
        for check in ("bitwise OK", "bound OK"):
            assert f"rank0 {case} {check}" in out and f"rank1 {case} {check}" in out, out[-4000:]
    print("\n".join(line for line in out.splitlines() if "stream_peak=" in line))  # the measured numbers (-s)


DENSE = {"config": {"model_type": "qwen2", "vocab_size": 1023, "hidden_size": 512, "intermediate_size": 2048,
                    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "max_position_embeddings": 64, "tie_word_embeddings": False}}
BUCKET = 4 * MIB


def _loss(logp, rows):
    import torch

    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return -(logp * adv[rows, None]).mean(), {}


def _worker() -> None:  # pragma: no cover - runs under torchrun
    import functools
    import gc

    import torch
    import torch.distributed as dist
    from test_megatron_refit_memory import _peak_extra_mib, digest  # same folder (torchrun's sys.path)

    sys.path.insert(0, str(HERE))
    from conftest import synthetic_batch

    from nemo_rl_fp16.policy.torch_policy import TorchPolicy
    from nemo_rl_fp16.precision import PrecisionPolicy
    from nemo_rl_fp16.rollout.refit import iter_buckets

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def refit(tr, streamed: dict) -> None:
        for bucket in iter_buckets(tr.rollout_stream(0), torch.float16, BUCKET):
            for name, view in bucket.tensors():
                streamed[name] = digest(view)
            del bucket

    for case in CASES:
        cfg = {"config": {**DENSE["config"], "tie_word_embeddings": case == "tied"}}
        tr = TorchPolicy(cfg, PrecisionPolicy.from_name("bf16"), lr=1e-3, micro_batch_size=2)  # no overflow skip
        assert tr._fsdp
        batch = synthetic_batch(1023, 4, 3, 4, seed=0)
        tr.logprobs(batch, 1.0)
        step = tr.train_step(batch, _loss, 1.0)
        assert not step.skipped and step.grad_norm > 0  # the weights moved: the stream reads the trained master
        # bitwise: the fp32 stream equals the full state dict, name for name, in order
        full = tr.rollout_state_dict()
        got = list(tr.rollout_stream(0))
        if rank == 0:
            assert [k for k, _ in got] == list(full), set(full) ^ {k for k, _ in got}
            for k, v in got:
                assert v.dtype == torch.float32 and torch.equal(v, full[k]), k
        else:
            assert got == []
        sizes = [v.numel() * 4 for v in full.values()] if rank == 0 else []
        model_mib = sum(sizes) / MIB if rank == 0 else 0.0
        param_mib = max(sizes) / MIB if rank == 0 else 0.0
        want = {k: digest(v.to(torch.float16)) for k, v in full.items()} if rank == 0 else {}
        del full, got
        gc.collect()
        print(f"rank{rank} {case} bitwise OK", flush=True)
        streamed: dict[str, str] = {}
        stream_peak = _peak_extra_mib(functools.partial(refit, tr, streamed))
        old_peak = _peak_extra_mib(tr.rollout_state_dict)
        print(f"rank{rank} {case} model={model_mib:.1f} MiB largest_param={param_mib:.1f} MiB bucket="
              f"{BUCKET / MIB:.0f} MiB stream_peak={stream_peak:.1f} MiB full_state_peak={old_peak:.1f} MiB", flush=True)
        if rank == 0:
            assert streamed == want  # the fp16 buckets hold the full-state refit's values
            assert old_peak > model_mib, (case, old_peak, model_mib)  # the measurement sees a whole-model copy
            bound = 3 * param_mib + 1.5 * BUCKET / MIB + 8  # gathered shards + the whole parameter + one bucket
            assert stream_peak <= bound, (case, stream_peak, bound)
            assert stream_peak < model_mib / 4, (case, stream_peak, model_mib)
        else:
            assert streamed == {}
            assert stream_peak <= 8, (case, stream_peak)  # sends its shards, materialises nothing
        print(f"rank{rank} {case} bound OK", flush=True)
        del tr
        gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
