"""PP=2 == PP=1 on CPU: megatron-core's pipeline schedule, 2 processes, gloo, one torchrun launch.

The PP=1 reference runs single-process in the test's own process and is written to a file; the two
torchrun workers (this file run as a script; they apply the CPU redirects of conftest.py
themselves) build the same model at PP=2 and compare, on every rank:

- log-probs (broadcast from the last stage) and the fp16 range monitor's per-layer maxima;
- one optimizer step over 6 rows in micro-batches of 4 (a ragged last micro-batch): the loss and
  the loss closure's metrics, the fp32 master gradients of every parameter gathered from both
  stages (untied and tied embeddings: the tied copies' gradients summed), the total grad norm
  and the post-step weights (refit from every stage);
- fp16 with dynamic loss scaling: the same step's loss scale and gradients, then an overflow
  planted on the last stage only: both stages skip, weights unchanged, the scale backs off as on PP=1;
- a distributed checkpoint at PP=2: save -> load into a fresh PP=2 policy -> bitwise the same
  weights and the same next step; its streamed, sharded HF export (in the test process) holds
  bitwise the refit weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "unit" / "policy"  # conftest.py: free_port, cpu_redirects (pytest fixtures do not reach torchrun)
MEGATRON = HERE / "megatron"  # test_policy.py: DENSE, _batch, _weights
CASES = ("dense", "tied", "fp16")
CHECKS = [f"{c} {what} OK" for c in CASES for what in ("logprobs", "headroom", "step")] + [
    "fp16 overflow OK", "dense checkpoint OK"]


def _cfg(case: str) -> dict:
    from test_policy import DENSE

    return {"config": {**DENSE["config"], "tie_word_embeddings": case == "tied"}}


def _loss_fn(batch):
    import torch

    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(1))
    mask = batch.response_mask.float()

    def loss_fn(logp, rows):
        loss = -(logp * adv[rows, None] * mask[rows]).sum() / mask.sum()
        return loss, {"kl": (logp * mask[rows]).sum().detach() / mask.sum()}

    return loss_fn


def _capture(policy, box: dict):
    """A grad hook that keeps the fp32 master grads under this stage's megatron names."""
    from nemo_rl_fp16.policy.megatron.model import unwrap

    def hook(grads):
        box.clear()
        box.update({k: p.grad.clone() for k, p in unwrap(policy.master.module).named_parameters()
                    if p.grad is not None})

    return hook


def _plant_inf(grads):
    grads[-1].view(-1)[0] = float("inf")


def _run(case: str, pp: int, ckpt_dir: str | None = None) -> dict:
    """Every observable of one case at PP=`pp` (a collective under PP)."""
    import torch
    from test_policy import _batch, _weights

    from nemo_rl_fp16.policy.megatron.pipeline import gather_stages
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.precision import PrecisionPolicy

    cfg = _cfg(case)
    _, sd = _weights(cfg)
    pol = PrecisionPolicy.from_name("fp16" if case == "fp16" else "fp32")
    kw = dict(lr=1e-3, micro_batch_size=4, initial_state_dict=sd, pipeline_parallel_size=pp)
    tr = MegatronPolicy(cfg, pol, **kw)
    b = _batch()
    out = {"logp": tr.logprobs(b, 0.8), "headroom": tr.activation_headroom(b)}
    grads: dict = {}
    tr.grad_hook = _capture(tr, grads)
    res = tr.train_step(b, _loss_fn(b), 0.8)
    tied = cfg["config"]["tie_word_embeddings"]
    out.update(metrics=res.metrics, grad_norm=res.grad_norm, skipped=res.skipped,
               grads=gather_stages(grads, tr.layout.num_layers, tied) if pp > 1 else grads,
               weights=tr.rollout_state_dict())
    if case == "fp16":
        tr.grad_hook = _plant_inf if pp == 1 or torch.distributed.get_rank() == 1 else None
        before = tr.rollout_state_dict()
        res2 = tr.train_step(b, _loss_fn(b), 0.8)
        after = tr.rollout_state_dict()
        out.update(overflow_skipped=res2.skipped, overflow_unchanged=all(torch.equal(before[k], after[k]) for k in before),
                   scale_after=tr.scaler.scale)
    if ckpt_dir is not None:
        tr.grad_hook = None
        tr.save_sharded(ckpt_dir, step=1)
        fresh = MegatronPolicy(cfg, pol, **kw)
        fresh.load_sharded(ckpt_dir)
        out["restored_equal"] = all(torch.equal(v, out["weights"][k]) for k, v in fresh.rollout_state_dict().items())
        tr.train_step(b, _loss_fn(b), 0.8)
        fresh.train_step(b, _loss_fn(b), 0.8)
        w1, w2 = tr.rollout_state_dict(), fresh.rollout_state_dict()
        out["next_step_equal"] = all(torch.equal(w1[k], w2[k]) for k in w1)
    return out


def test_pp2_matches_pp1(tmp_path):
    pytest.importorskip("megatron.core")
    import torch
    sys.path[:0] = [str(HERE), str(MEGATRON)]
    from conftest import cpu_redirects, reset_megatron, torchrun

    ref = {}
    with cpu_redirects():  # the PP=1 reference (tests/unit's mcore_cpu fixture does not reach tests/integration)
        for case in CASES:
            reset_megatron()
            ref[case] = _run(case, 1)
        reset_megatron()
    torch.save(ref, tmp_path / "ref.pt")
    out = torchrun(Path(__file__), timeout=600, PP_REF=str(tmp_path / "ref.pt"), CKPT_DIR=str(tmp_path / "dist"))
    print("\n".join(line for line in out.splitlines() if " OK" in line))
    for check in CHECKS:
        assert f"rank0 {check}" in out and f"rank1 {check}" in out, out[-4000:]

    # HF export (streamed, sharded) from the PP=2 distributed checkpoint: bitwise the refit weights
    from safetensors.torch import load_file

    from nemo_rl_fp16.policy.megatron.dist_export import export_hf_from_dist

    want = torch.load(tmp_path / "pp2_weights.pt")
    with cpu_redirects():
        hf = export_hf_from_dist(tmp_path / "dist", _cfg("dense"), tmp_path / "hf", max_shard_bytes=32 * 1024)
    got = {}
    for f in hf.glob("model-*-of-*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _worker() -> None:  # pragma: no cover - runs under torchrun
    sys.path[:0] = [str(HERE), str(MEGATRON)]
    import torch
    import torch.distributed as dist
    from conftest import cpu_redirects, reset_megatron

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref = torch.load(os.environ["PP_REF"], weights_only=False)
    ckpt = os.environ["CKPT_DIR"]
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()

    def say(msg):
        print(f"rank{rank} {msg}", flush=True)

    with cpu_redirects():
        for case in CASES:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            r = ref[case]
            got = _run(case, 2, ckpt if case == "dense" else None)
            tol = 1e-5  # fp32 noise (the stages sum the tied gradient and the norm in another order)
            err = (got["logp"] - r["logp"]).abs().max().item()
            assert err < tol, (case, "logp", err)
            say(f"{case} logprobs OK max|diff|={err:.2e}")
            assert set(got["headroom"]) == set(r["headroom"]), (sorted(got["headroom"]), sorted(r["headroom"]))
            for k, v in r["headroom"].items():
                assert abs(got["headroom"][k] - v) <= tol * abs(v), (case, k, got["headroom"][k], v)
            say(f"{case} headroom OK")
            assert not got["skipped"] and not r["skipped"]
            assert set(got["metrics"]) == set(r["metrics"]), (got["metrics"], r["metrics"])
            for k, v in r["metrics"].items():
                assert abs(got["metrics"][k] - v) <= tol * max(abs(v), 1e-6), (case, k, got["metrics"][k], v)
            assert set(got["grads"]) == set(r["grads"]), set(got["grads"]) ^ set(r["grads"])
            gerr = max((got["grads"][k] - r["grads"][k]).abs().max().item() /
                       max(r["grads"][k].abs().max().item(), 1e-30) for k in r["grads"])
            assert gerr < tol, (case, "grads", gerr)
            assert abs(got["grad_norm"] - r["grad_norm"]) <= tol * r["grad_norm"], (got["grad_norm"], r["grad_norm"])
            assert set(got["weights"]) == set(r["weights"])
            werr = max((got["weights"][k] - r["weights"][k]).abs().max().item() for k in r["weights"])
            assert werr < 1e-5, (case, "weights", werr)
            say(f"{case} step OK grads rel|diff|={gerr:.2e} weights max|diff|={werr:.2e}")
            if case == "fp16":
                assert got["overflow_skipped"] and r["overflow_skipped"]
                assert got["overflow_unchanged"] and r["overflow_unchanged"]
                assert got["scale_after"] == r["scale_after"], (got["scale_after"], r["scale_after"])
                say("fp16 overflow OK")
            if case == "dense":
                assert got["restored_equal"] and got["next_step_equal"]
                if rank == 0:  # the weights the checkpoint holds, for the HF export check in the test process
                    torch.save(got["weights"], os.path.join(ckpt, "..", "pp2_weights.pt"))
                say("dense checkpoint OK")
    reset_megatron()


if __name__ == "__main__":
    _worker()
