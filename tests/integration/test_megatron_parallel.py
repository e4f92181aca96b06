"""TP=2 == DP=2 (dense; also TP > kv heads) and EP=2 == DP=2 (MoE) log-probs on CPU: 2 processes, gloo, one torchrun launch.

The worker is this file run as a script (`__main__`); it applies the test-only CUDA redirects
from tests/unit/policy/conftest.py itself (pytest fixtures do not reach torchrun's processes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HELPERS = ROOT / "tests" / "unit" / "policy"  # conftest.py: free_port, cpu_redirects
MEGATRON = HELPERS / "megatron"  # test_policy.py: DENSE, MOE, _batch, _weights


def test_tp2_and_ep2_match_single_rank(tmp_path):
    pytest.importorskip("megatron.core")
    sys.path.insert(0, str(HELPERS))
    from conftest import torchrun

    # the workers import this checkout's package (torchrun puts the script's folder, not the cwd, on sys.path)
    out = torchrun(Path(__file__), timeout=240)
    for check in ("TP2 logprobs OK", "TP2 refit OK", "EP2 logprobs OK", "EP2 experts OK", "EP2 refit OK",
                  "TP2-KV1 logprobs OK", "TP2-KV1 refit OK"):
        assert f"rank0 {check}" in out and f"rank1 {check}" in out, out[-4000:]


def _worker() -> None:  # pragma: no cover - runs under torchrun
    sys.path[:0] = [str(HELPERS), str(MEGATRON)]
    import torch
    import torch.distributed as dist
    from conftest import cpu_redirects
    from megatron.core import parallel_state
    from test_policy import DENSE, MOE, _batch, _weights

    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.precision import PrecisionPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pol = PrecisionPolicy.from_name("fp32")

    def run(cfg, sd, **par):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        tr = MegatronPolicy(cfg, pol, lr=1e-3, micro_batch_size=3, initial_state_dict=sd, **par)
        b = _batch()
        return tr, tr.logprobs(b, 0.8), b

    with cpu_redirects():
        # TP2-KV1: TP above the kv heads (megatron-core gathers each query group's K/V), with o_proj/MLP biases
        kv1 = {"config": {**DENSE["config"], "model_type": "llama", "num_key_value_heads": 1, "attention_bias": True,
                          "mlp_bias": True}}
        for tag, cfg, par in (("TP2", DENSE, {"tensor_parallel_size": 2}), ("EP2", MOE, {"expert_parallel_size": 2}),
                              ("TP2-KV1", kv1, {"tensor_parallel_size": 2})):
            _, sd = _weights(cfg)
            ref_tr, ref, b = run(cfg, sd)  # TP 1 on 2 ranks = DP 2: each rank scores half the rows, gathered
            assert ref_tr.adapter.data_parallel()[:2] == (rank, 2)
            ref_ex = ref_tr.selected_experts(b) if tag == "EP2" else None
            tr, lp, _ = run(cfg, sd, **par)
            err = (lp - ref).abs().max().item()
            assert err < 1e-5, (tag, err)
            print(f"rank{rank} {tag} logprobs OK max|diff|={err:.2e}", flush=True)
            if ref_ex is not None:
                assert torch.equal(tr.selected_experts(b), ref_ex)
                print(f"rank{rank} {tag} experts OK", flush=True)
            back = tr.rollout_state_dict()
            assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd), (tag, set(back) ^ set(sd), [k for k in sd if k in back and not torch.equal(back[k], sd[k])])
            print(f"rank{rank} {tag} refit OK", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
