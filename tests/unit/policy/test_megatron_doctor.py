"""Mismatch doctor with the megatron trainer (CPU, one process, gloo): its decoder blocks and parts
line up with the HF rollout path's names token for token, planted faults, what it cannot see."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16 import doctor
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.precision import PrecisionPolicy

pytest.importorskip("megatron.core")

from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy  # noqa: E402
from nemo_rl_fp16.rollout import TorchRolloutEngine  # noqa: E402

VOCAB = 64
DENSE = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 64, "tie_word_embeddings": False}}
MOE = {"config": {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "norm_topk_prob": True, "max_position_embeddings": 64, "tie_word_embeddings": False}}


def _pair(cfg, name, sd):
    pol = PrecisionPolicy.from_name(name)
    return (TorchRolloutEngine(cfg, pol, pad_token_id=0, eos_token_id=1, initial_state_dict=sd),
            MegatronPolicy(cfg, pol, lr=1e-3, micro_batch_size=64, initial_state_dict=sd))


def _sample(cfg, sd):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (8,), generator=g)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, num_generations=2, seed=3, stop_token_ids=(1,))
    eng, tr = _pair(cfg, "fp32", sd)
    batch = eng.generate(prompts, params)
    assert bool((batch.attention_mask[:, 0] == 0).any()), "want left-padded prompts (megatron rotates those rows)"
    return (eng, tr), batch


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["qwen2", "qwen3_moe"])
def test_megatron_points_align_with_hf_names_token_for_token(mcore_cpu, cfg):
    sd = build_model(cfg, torch.float32, seed=0).state_dict()
    (eng, tr), batch = _sample(cfg, sd)
    dec, _ = doctor.decode_path(eng, batch)
    one, logp = doctor.onepass_path(tr, batch, 1.0)
    names = [p.name for p in doctor.probe_points(eng.model)]
    assert [p.name for p in doctor.probe_points(tr.compute)] == names  # same names, same forward order
    assert set(one) == set(dec)  # every point visible (local spec), MoE expert ids too
    mask = batch.response_mask.bool()
    for name in names:
        d = doctor.divergence(dec[name], one[name], mask)
        assert d["rel_max"] < 1e-5, (name, d["rel_max"])  # fp32, two implementations: ~1e-6
        shifted = doctor.divergence(dec[name][:, 1:], one[name][:, :-1], mask[:, 1:] & mask[:, :-1])
        assert shifted["rel_norm"] > 1e-2, name
        if f"{name}:topk" in dec:
            assert torch.equal(dec[f"{name}:topk"][mask], one[f"{name}:topk"][mask]), name
    torch.testing.assert_close(logp.masked_fill(~mask, 0.0), tr.logprobs(batch, 1.0).cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_megatron_planted_fault_is_first_flagged(mcore_cpu, name):
    sd = build_model(MOE, torch.float32, seed=0).state_dict()
    fp32, batch = _sample(MOE, sd)
    reference = doctor.replay(*fp32, batch, "fp32", 1.0)["outputs"]
    eng, tr = _pair(MOE, name, sd)
    clean = doctor.replay(eng, tr, batch, name, 1.0, reference=reference)
    assert clean["first_flagged"] is None, [(x["name"], x["ratio"]) for x in clean["layers"]]
    with doctor.planted_fault(eng.model, "model.layers.1.input_layernorm.weight", 1.0 + 1e-2):
        r = doctor.replay(eng, tr, batch, name, 1.0, reference=reference)
    assert r["first_flagged"] == "layers.1.input_layernorm", [(x["name"], x["ratio"]) for x in r["layers"]]


def test_megatron_point_it_cannot_see_is_reported(mcore_cpu):
    """A norm megatron fuses into the next linear (Transformer Engine spec: an IdentityOp in its place)
    has no output to hook: the row says so instead of holding a number."""
    from megatron.core.transformer.identity_op import IdentityOp

    sd = build_model(DENSE, torch.float32, seed=0).state_dict()
    (eng, tr), batch = _sample(DENSE, sd)
    tr.compute.module.decoder.layers[0].input_layernorm = IdentityOp()
    r = doctor.replay(eng, tr, batch, "fp32", 1.0)
    row = next(x for x in r["layers"] if x["name"] == "layers.0.input_layernorm")
    assert not row["visible"] and row["rel_norm"] is None and not row["flagged"]
    assert "linear_qkv" in row["why_not"]
    assert all(x["visible"] for x in r["layers"] if x["name"] != "layers.0.input_layernorm")


def test_run_doctor_with_the_megatron_trainer(mcore_cpu, tmp_path):
    from nemo_rl_fp16.config import ConfigError, load_recipe
    from nemo_rl_fp16.doctor_report import run_doctor

    quiet = Console(quiet=True)
    over = [f"output_dir={tmp_path}/x", "policy.backend=megatron", "device=cpu", "mismatch.num_prompts=4",
            "rollout.max_new_tokens=8"]
    with pytest.raises(ConfigError, match="tensor_parallel_size=2; allowed: 1"):
        run_doctor(load_recipe("moe_tiny", [*over, "policy.tensor_parallel_size=2"]), ["fp16"], console=quiet)
    report = run_doctor(load_recipe("moe_tiny", over), ["fp32", "fp16"], console=quiet)
    on_disk = json.loads((tmp_path / "x" / "doctor" / "report.json").read_text())
    assert on_disk["backends"]["policy"] == "megatron"
    rows = report["precisions"]["fp16"]["layers"]
    assert all(x["visible"] for x in rows) and sum("topk_flip_rate" in x for x in rows) == 2
    assert "trainer: megatron" in (tmp_path / "x" / "doctor" / "report.md").read_text()
