"""TP=2 train steps sum the partial gradients over TP (megatron-core's `finalize_model_grads`), CPU, 2 processes.

With TP=2 each rank sees half of the attention heads, so the gradient of a Qwen3 q/k norm weight
(shared by all heads) is partial on each rank; DDP's `finish_grad_sync()` alone leaves it so and the
replicated weights drift apart across TP ranks. After a step, every replicated weight must be
bitwise equal on both TP ranks, and the gradients (gathered) and their norm must equal a single-process step (to
fp32 reduction-order tolerance) for TP=2 and for DP=2. Sequence parallel cannot be built on CPU
(the local spec's `WrappedTorchNorm` refuses it), so only the q/k-norm and the DP sums are
exercised here. The worker is this file run under torchrun.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "unit" / "policy"  # conftest.py: free_port, cpu_redirects, reset_megatron
MEGATRON = HELPERS / "megatron"  # test_policy.py: _batch, _loss_fn, _weights
QWEN3 = {"config": {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "max_position_embeddings": 64, "rope_theta": 5000.0, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False}}


def _step(sd, **par):
    from test_policy import _batch, _loss_fn

    from nemo_rl_fp16.policy.megatron.convert import megatron_to_hf
    from nemo_rl_fp16.policy.megatron.model import unwrap
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.policy.megatron.sharding import gather_full_state_dict
    from nemo_rl_fp16.precision import PrecisionPolicy

    tr = MegatronPolicy(QWEN3, PrecisionPolicy.from_name("fp32"), lr=1e-2, micro_batch_size=3, max_grad_norm=0.5,
                        initial_state_dict=sd, **par)
    grads = {}

    def keep(_):  # the unscaled fp32 master grads after the reduction, gathered into HF names (a collective)
        named = {k: p.grad.clone() for k, p in unwrap(tr.master.module).named_parameters() if p.grad is not None}
        grads.update(megatron_to_hf(gather_full_state_dict(named, tr.layout), tr.layout))

    tr.grad_hook = keep
    b = _batch()
    res = tr.train_step(b, _loss_fn(b), 1.0)
    return tr, res, grads


def test_tp2_step_keeps_replicated_weights_equal(tmp_path):
    pytest.importorskip("megatron.core")
    sys.path[:0] = [str(HELPERS), str(MEGATRON)]
    from conftest import cpu_redirects, reset_megatron, torchrun
    from test_policy import _weights

    reset_megatron()
    with cpu_redirects():  # the single-process reference (pytest fixtures of tests/unit do not reach here)
        _, sd = _weights(QWEN3)
        _, res, grads = _step(sd)
        reset_megatron()
    torch.save({"init": sd, "grads": grads, "grad_norm": res.grad_norm}, tmp_path / "ref.pt")
    out = torchrun(Path(__file__), timeout=300, GRAD_SYNC_REF=str(tmp_path / "ref.pt"))
    for check in ("TP2 replicated equal", "TP2 == single grads", "DP2 == single grads"):
        assert f"rank0 {check}" in out and f"rank1 {check}" in out, out[-4000:]


def _worker() -> None:  # pragma: no cover - runs under torchrun
    sys.path[:0] = [str(HELPERS), str(MEGATRON)]
    import torch.distributed as dist
    from conftest import cpu_redirects
    from megatron.core import parallel_state

    from nemo_rl_fp16.policy.megatron.model import unwrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref = torch.load(os.environ["GRAD_SYNC_REF"])
    with cpu_redirects():
        for tag, par in (("TP2", {"tensor_parallel_size": 2}), ("DP2", {})):
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            tr, res, grads = _step(ref["init"], **par)
            assert not res.skipped
            if tag == "TP2":
                named = dict(unwrap(tr.master.module).named_parameters())
                replicated = sorted(k for k, p in named.items() if not getattr(p, "tensor_model_parallel", False))
                assert any("q_layernorm" in k for k in replicated), replicated
                for k in replicated:
                    both = [torch.empty_like(named[k]) for _ in range(2)]
                    dist.all_gather(both, named[k].detach().contiguous())
                    assert torch.equal(both[0], both[1]), f"{k} differs across TP ranks"
                print(f"rank{rank} {tag} replicated equal ({len(replicated)} tensors)", flush=True)
            assert abs(res.grad_norm - ref["grad_norm"]) < 1e-5 * ref["grad_norm"], (tag, res.grad_norm, ref["grad_norm"])
            assert set(grads) == set(ref["grads"]), set(grads) ^ set(ref["grads"])
            for k, g in ref["grads"].items():  # each gradient, summed over ranks, equals the single-process one
                err = (grads[k] - g).abs().max().item()
                assert err <= 1e-5 * g.abs().max().item() + 1e-9, (tag, k, err, g.abs().max().item())
            print(f"rank{rank} {tag} == single grads", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
