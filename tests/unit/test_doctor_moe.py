"""Mismatch doctor on the tiny MoE (`moe_tiny`): router-logit gap and top-k flip rate per layer,
flips named as the cause of an MoE block's divergence, R3, a planted router fault, the report."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16 import doctor
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.doctor_report import run_doctor
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.mismatch import router_topk_flip_rate_by_layer
from nemo_rl_fp16.precision import PrecisionPolicy

QUIET = Console(quiet=True)
ROUTERS = ["layers.0.mlp.gate", "layers.1.mlp.gate"]


@pytest.fixture(scope="module")
def moe():
    from nemo_rl_fp16.assembly import build_tokenizer, initial_weights
    from nemo_rl_fp16.data import get_dataset
    from nemo_rl_fp16.policy import TorchPolicy
    from nemo_rl_fp16.rollout import TorchRolloutEngine

    rc = typed(load_recipe("moe_tiny", ["rollout.max_new_tokens=24"]))
    tok = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    prompts = [tok(problems[i].prompt)["input_ids"] for i in range(12)]
    init = initial_weights(rc, tok, problems, QUIET)
    model_cfg = rc.model.model_dump()

    def engines(name, router_replay="none"):
        pol = PrecisionPolicy.from_name(name)
        eng = TorchRolloutEngine(model_cfg, pol, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 initial_state_dict=init)
        trainer = TorchPolicy(model_cfg, pol, lr=1e-3, micro_batch_size=64, initial_state_dict=init,
                                     router_replay=router_replay)
        return eng, trainer

    params = SamplingParams(max_new_tokens=24, temperature=1.0, num_generations=4, seed=3,
                            stop_token_ids=(tok.eos_token_id,))
    built = {name: engines(name) for name in ("fp32", "fp16", "bf16")}
    batch = built["fp32"][0].generate(prompts, params)
    reference = doctor.replay(*built["fp32"], batch, "fp32", 1.0)["outputs"]
    return {"engines": built, "make": engines, "batch": batch, "prompts": prompts, "params": params,
            "reference": reference}


def test_router_points_per_layer_with_gap_in_u_and_flip_rate(moe):
    eng, trainer = moe["engines"]["fp16"]
    names = [p.name for p in doctor.probe_points(eng.model)]
    assert [n for n in names if n.endswith(".gate")] == ROUTERS
    assert names.index("layers.0.post_attention_layernorm") < names.index("layers.0.mlp.gate") < names.index("layers.0.mlp")
    r = doctor.replay(eng, trainer, moe["batch"], "fp16", 1.0, reference=moe["reference"])
    rows = {x["name"]: x for x in r["layers"]}
    for name in ROUTERS:
        row = rows[name]
        assert row["what"] == "router logits (MoE gate)"
        assert 0 < row["rel_norm_u"] < 2 and row["rel_max_u"] >= row["rel_norm_u"] * 0.5  # rounding level, in fp16 u
        assert 0.0 <= row["topk_flip_rate"] <= 1.0
    assert r["first_flagged"] is None


def test_flip_rate_is_the_engines_own_routing(moe):
    """The decode path's top-k are the experts the rollout engine recorded while sampling, the one-pass
    path's the trainer's `selected_experts`: the doctor's per-layer flip rate is theirs."""
    eng, trainer = moe["engines"]["bf16"]
    batch = eng.generate(moe["prompts"], moe["params"])
    mask = batch.response_mask.bool()
    dec, _ = doctor.decode_path(eng, batch)
    one, _ = doctor.onepass_path(trainer, batch, 1.0)
    own = trainer.selected_experts(batch)
    for i, name in enumerate(ROUTERS):
        assert torch.equal(dec[f"{name}:topk"][mask].short(), batch.rollout_experts[:, :, i][mask].sort(-1).values)
        assert torch.equal(one[f"{name}:topk"][mask].short(), own[:, :, i][mask].sort(-1).values)
    r = doctor.replay(eng, trainer, batch, "bf16", 1.0)
    expected = router_topk_flip_rate_by_layer(own, batch.rollout_experts, mask)
    assert [x["topk_flip_rate"] for x in r["layers"] if x["name"] in ROUTERS] == pytest.approx(expected, abs=0)


def test_flagged_moe_block_names_flips_and_r3_removes_them(moe):
    eng, trainer = moe["engines"]["bf16"]
    r = doctor.replay(eng, trainer, moe["batch"], "bf16", 1.0)  # bare 2 u level: flips stand out
    rows = {x["name"]: x for x in r["layers"]}
    assert rows["layers.0.mlp.gate"]["topk_flip_rate"] > 0  # bf16 rounding flips some top-k sets
    assert not rows["layers.0.mlp.gate"]["flagged"]  # while the router logits sit at rounding level
    assert rows["layers.0.mlp"]["flagged"] and rows["layers.0.mlp"]["flag_cause"] == "top-k flips"
    assert rows["layers.0.mlp"]["rel_norm_u_unflipped"] < r["noise_u"] < rows["layers.0.mlp"]["rel_norm_u"]
    assert r["first_flagged"] == "layers.0.mlp"
    # R3: the trainer is routed to the experts the decode path picked; the routers still disagree (same flip
    # rate of their own top-k), but the MoE block no longer does
    eng3, trainer3 = moe["make"]("bf16", router_replay="rollout")
    r3 = doctor.replay(eng3, trainer3, moe["batch"], "bf16", 1.0)
    rows3 = {x["name"]: x for x in r3["layers"]}
    assert r3["r3"] and not r["r3"]
    assert rows3["layers.0.mlp.gate"]["topk_flip_rate"] == rows["layers.0.mlp.gate"]["topk_flip_rate"]
    assert rows3["layers.0.mlp"]["rel_norm_u"] < r["noise_u"] and not rows3["layers.0.mlp"]["flagged"]
    assert r3["first_flagged"] is None and r3["logp_gap"]["max"] < r["logp_gap"]["max"]


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_planted_router_fault_is_first_flagged(moe, name):
    eng, trainer = moe["engines"][name]
    with doctor.planted_fault(eng.model, "model.layers.0.mlp.gate.weight", 1.0 + 1e-2):
        r = doctor.replay(eng, trainer, moe["batch"], name, 1.0, reference=moe["reference"])
    seen = [(x["name"], round(x["ratio"] or 0, 2)) for x in r["layers"]]
    assert r["first_flagged"] == "layers.0.mlp.gate", seen
    gate = next(x for x in r["layers"] if x["name"] == "layers.0.mlp.gate")
    assert gate["ratio"] > 1.5 * doctor.NOISE_RATIO, seen


def test_doctor_report_on_moe_tiny(tmp_path):
    cfg = load_recipe("moe_tiny", [f"output_dir={tmp_path}", "mismatch.num_prompts=4", "rollout.max_new_tokens=8",
                                   "device=cpu"])
    report = run_doctor(cfg, ["fp32", "bf16"], console=QUIET)
    out = tmp_path / "doctor"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["precisions"]["bf16"]["noise_ratio"] == doctor.NOISE_RATIO  # the fp32 run is its reference
    assert on_disk["precisions"]["fp32"]["noise_ratio"] is None
    gates = [x for x in report["precisions"]["bf16"]["layers"] if x["name"] in ROUTERS]
    assert len(gates) == 2 and all("topk_flip_rate" in x for x in gates)
    md = (out / "report.md").read_text()
    assert "`layers.1.mlp.gate` | router logits (MoE gate)" in md and "flips" in md
    assert (out / "divergence_vs_layer.png").stat().st_size > 1000
