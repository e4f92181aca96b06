"""Megatron distributed checkpoints on CPU (gloo, 2 processes, one torchrun launch).

TP=2 (dense) and EP=2 (MoE), fp16 with its loss scaler: save -> load into a fresh policy of the
same layout gives bitwise the same fp32 master weights, AdamW state (moments and step), loss scale,
log-probs, and the next optimizer step; load into TP=1 / EP=1 (DP=2, megatron-core re-slices the
global tensors) gives bitwise the same gathered weights and moments; a checkpoint that cannot load
(loss scaling on one side only, another model) is refused in one line naming both layouts.

The optimizer state comes from AdamW steps on elementwise gradients (`grad = sin(7 p)`), which
give the same values whatever the sharding (a real multi-process train step sums gradients in
another order per layout: test_megatron_grad_sync.py). The worker is this file run as a script.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "unit" / "policy"  # conftest.py: free_port, cpu_redirects, reset_megatron
MEGATRON = HELPERS / "megatron"  # test_policy.py: DENSE, MOE, _batch, _weights
CHECKS = ("TP2 same-layout OK", "TP2 next-step OK", "TP2 resharded-TP1 OK", "TP2 refusal OK",
          "EP2 same-layout OK", "EP2 next-step OK", "EP2 resharded-EP1 OK", "EP2 refusal OK")


def test_dist_checkpoint_tp2_ep2_resume_and_reshard(tmp_path):
    pytest.importorskip("megatron.core")
    sys.path[:0] = [str(HELPERS), str(MEGATRON)]
    from conftest import torchrun

    out = torchrun(Path(__file__), timeout=600, CKPT_ROOT=str(tmp_path))
    for check in CHECKS:
        assert f"rank0 {check}" in out and f"rank1 {check}" in out, out[-4000:]

    # HF export from the TP=2 and EP=2 distributed checkpoints, offline in this one process
    import torch
    from conftest import reset_megatron
    from safetensors.torch import load_file
    from test_policy import DENSE, MOE

    from nemo_rl_fp16.modeling.layout import ModelLayout
    from nemo_rl_fp16.policy.megatron.convert import megatron_to_hf
    from nemo_rl_fp16.policy.megatron.dist_export import export_hf_from_dist

    reset_megatron()
    for tag, cfg in (("TP2", DENSE), ("EP2", MOE)):
        got = load_file(str(export_hf_from_dist(tmp_path / tag, cfg, tmp_path / f"hf_{tag}") / "model.safetensors"))
        want = megatron_to_hf(load_file(str(tmp_path / f"{tag}_full.safetensors")), ModelLayout.from_hf_config(cfg["config"]))
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), tag
        # streamed into shards of <= 64 KiB: HF's index names every tensor once, the values are bitwise the same
        small = export_hf_from_dist(tmp_path / tag, cfg, tmp_path / f"hf_{tag}_sharded", max_shard_bytes=64 * 1024)
        index = json.loads((small / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 2 and not (small / "model.safetensors").exists(), files
        assert files == sorted(f.name for f in small.glob("model-*-of-*.safetensors"))
        merged = {}
        for f in files:
            part = load_file(str(small / f))
            assert all(index["weight_map"][k] == f for k in part)
            big = [k for k, v in part.items() if v.numel() * v.element_size() > 64 * 1024]
            assert len(part) == 1 or not big, (f, big)  # only a single oversize tensor exceeds the shard size
            merged.update(part)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
        assert set(merged) == set(want) and all(torch.equal(merged[k], want[k]) for k in want), tag
    with pytest.raises(ValueError, match="holds another model"):
        export_hf_from_dist(tmp_path / "TP2", MOE, tmp_path / "hf_bad")


def _worker() -> None:  # pragma: no cover - runs under torchrun
    sys.path[:0] = [str(HELPERS), str(MEGATRON)]
    import torch
    import torch.distributed as dist
    from conftest import cpu_redirects
    from megatron.core import parallel_state
    from test_policy import DENSE, MOE, _batch, _weights

    from nemo_rl_fp16.policy.megatron.checkpointing import describe_layout, layout_record
    from nemo_rl_fp16.policy.megatron.model import unwrap
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.policy.megatron.sharding import gather_full_state_dict
    from nemo_rl_fp16.precision import PrecisionPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = Path(os.environ["CKPT_ROOT"])
    fp16 = PrecisionPolicy.from_name("fp16")

    def build(cfg, sd, pol=fp16, **par):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        return MegatronPolicy(cfg, pol, lr=1e-2, micro_batch_size=3, initial_state_dict=sd, **par)

    def fake_step(tr):  # AdamW on elementwise grads: the same values under any sharding
        for p in tr.weights.master.parameters():
            p.grad = torch.sin(7 * p.detach())
        tr.weights.optimizer.step()
        tr.weights.mark_stale()

    def named(tr, what=None):  # this rank's master params (what=None) or an AdamW moment, megatron names
        gpt = unwrap(tr.master.module)
        st = tr.weights.optimizer.state
        return {k: (p if what is None else st[p][what]) for k, p in gpt.named_parameters()}

    def full(tr, what=None):
        return {k: v.clone() for k, v in gather_full_state_dict(named(tr, what), tr.layout).items()}

    def same(a, b):
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    with cpu_redirects():
        b = _batch()
        for tag, cfg, par, other in (("TP2", DENSE, {"tensor_parallel_size": 2}, "TP1"),
                                     ("EP2", MOE, {"expert_parallel_size": 2}, "EP1")):
            _, sd = _weights(cfg)
            tr = build(cfg, sd, **par)
            fake_step(tr)
            fake_step(tr)
            assert tr.back_off_loss_scale(tr.scaler.scale)  # a non-default loss scale travels too
            d = root / tag
            if rank == 0:
                d.mkdir()
            dist.barrier()
            tr.save_sharded(d)
            w, m1, m2 = full(tr), full(tr, "exp_avg"), full(tr, "exp_avg_sq")
            local = {k: v.clone() for k, v in named(tr, "exp_avg_sq").items()}
            lp, scaler = tr.logprobs(b, 0.8), tr.scaler.state_dict()
            fake_step(tr)
            after = full(tr)
            del tr

            _, sd2 = _weights(cfg, seed=5)  # other weights: the load must overwrite all of them
            tr = build(cfg, sd2, **par)
            info = tr.load_sharded(d)
            assert info["rng_restored"] and info["saved"]["world"] == 2
            assert same(full(tr), w) and same(named(tr, "exp_avg_sq"), local), tag
            assert same(full(tr, "exp_avg"), m1) and same(full(tr, "exp_avg_sq"), m2), tag
            assert tr.scaler.state_dict() == scaler, (tr.scaler.state_dict(), scaler)
            assert torch.equal(tr.logprobs(b, 0.8), lp), tag
            print(f"rank{rank} {tag} same-layout OK", flush=True)
            fake_step(tr)  # AdamW's bias correction reads the restored step count
            assert same(full(tr), after), tag
            print(f"rank{rank} {tag} next-step OK", flush=True)

            tr = build(cfg, sd2)  # TP=1 / EP=1 on 2 ranks: DP=2
            info = tr.load_sharded(d)
            saved = info["saved"]
            assert saved[tag[:2].lower()] == 2 and layout_record(tr)[tag[:2].lower()] == 1
            assert same(full(tr), w) and same(full(tr, "exp_avg"), m1) and same(full(tr, "exp_avg_sq"), m2), tag
            assert tr.scaler.state_dict() == scaler
            print(f"rank{rank} {tag} resharded-{other} OK", flush=True)

            tr = build(cfg, sd2, pol=PrecisionPolicy.from_name("fp32"), **par)
            with pytest.raises(ValueError) as e:
                tr.load_sharded(d)
            msg = str(e.value)
            assert "\n" not in msg and "disagree on loss scaling" in msg, msg
            assert msg.count(describe_layout(saved)) == 2, msg  # both sides: the same layout here
            other_cfg = {"config": {**cfg["config"], "num_hidden_layers": 1}}
            tr = build(other_cfg, _weights(other_cfg)[1], **par)
            with pytest.raises(ValueError, match=r"a different model \(num_layers: 2 vs 1\)"):
                tr.load_sharded(d)
            print(f"rank{rank} {tag} refusal OK", flush=True)
            if rank == 0:  # for the offline HF export check in the test process
                from safetensors.torch import save_file

                save_file(w, str(root / f"{tag}_full.safetensors"))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
