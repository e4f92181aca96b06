"""Mismatch doctor: hook alignment, unit-roundoff scaling, planted faults, the command and its report."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16 import doctor
from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.doctor_report import parse_precisions, run_doctor
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.precision import PrecisionPolicy

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def setup():
    from nemo_rl_fp16.assembly import build_tokenizer, initial_weights
    from nemo_rl_fp16.data import get_dataset

    rc = typed(load_recipe("mismatch_tiny", ["rollout.max_new_tokens=24"]))
    tok = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    prompts = [tok(problems[i].prompt)["input_ids"] for i in range(12)]
    init = initial_weights(rc, tok, problems, QUIET)
    model_cfg = rc.model.model_dump()

    def engines(name):
        from nemo_rl_fp16.policy import TorchPolicy
        from nemo_rl_fp16.rollout import TorchRolloutEngine

        pol = PrecisionPolicy.from_name(name)
        eng = TorchRolloutEngine(model_cfg, pol, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 initial_state_dict=init)
        trainer = TorchPolicy(model_cfg, pol, lr=1e-3, micro_batch_size=64, initial_state_dict=init)
        return eng, trainer

    params = SamplingParams(max_new_tokens=24, temperature=1.0, num_generations=4, seed=3,
                            stop_token_ids=(tok.eos_token_id,))
    built = {name: engines(name) for name in ("fp32", "fp16", "bf16")}
    batch = built["fp32"][0].generate(prompts, params)
    assert batch.response_mask.sum(1).min() < batch.response_mask.shape[1], "want finished rows (padding) too"
    return {"engines": built, "batch": batch, "prompts": prompts, "params": params}


def test_hook_alignment_fp32_decode_and_onepass_agree_token_for_token(setup):
    eng, trainer = setup["engines"]["fp32"]
    batch = setup["batch"]
    dec, _ = doctor.decode_path(eng, batch)
    one, _ = doctor.onepass_path(trainer, batch, 1.0)
    n, t = batch.response_mask.shape
    names = [p[0] for p in doctor.probe_points(eng.model)]
    assert set(dec) == set(one) == set(names) and len(names) == 2 * 5 + 2  # 2 blocks x 5 points, norm, logits
    mask = batch.response_mask.bool()
    for name in names:
        assert dec[name].shape[:2] == one[name].shape[:2] == (n, t), name
        d = doctor.divergence(dec[name], one[name], mask)
        assert d["rel_max"] < 1e-5, (name, d["rel_max"])  # fp32: ~1e-7, the host BLAS's summation order
        # shifted by one position the same tensors are far apart: the alignment is what makes them agree
        shifted = doctor.divergence(dec[name][:, 1:], one[name][:, :-1], mask[:, 1:] & mask[:, :-1])
        assert shifted["rel_norm"] > 1e-2, name


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_replayed_logprobs_are_the_engines_own(setup, name):
    """The decode path is the rollout engine's (same log µ, bit for bit, as it sampling these tokens), the
    one-pass path the trainer's (same log π as `logprobs`)."""
    eng, trainer = setup["engines"][name]
    batch = eng.generate(setup["prompts"], setup["params"])
    r = doctor.replay(eng, trainer, batch, name, 1.0)
    torch.testing.assert_close(r["logp"]["decode"], batch.rollout_logp, rtol=0, atol=0)
    torch.testing.assert_close(r["logp"]["onepass"], trainer.logprobs(batch, 1.0), rtol=0, atol=0)


def test_unit_roundoff_per_precision_and_scaling(setup):
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        assert doctor.unit_roundoff(name) == doctor.unit_roundoff(dtype) == torch.finfo(dtype).eps / 2
    assert (doctor.unit_roundoff("fp16"), doctor.unit_roundoff("bf16")) == (2.0**-11, 2.0**-8)
    with pytest.raises(ValueError, match="fp8"):
        doctor.unit_roundoff("fp8")
    runs = {n: doctor.replay(*setup["engines"][n], setup["batch"], n, 1.0) for n in ("fp16", "bf16")}
    for a, b in zip(runs["fp16"]["layers"], runs["bf16"]["layers"], strict=True):
        if a["rel_norm"] == 0:
            continue
        assert a["rel_norm_u"] == pytest.approx(a["rel_norm"] / 2.0**-11)
        # same kernels, same roundings: in units of u the two precisions sit at the same level, so the
        # absolute divergence scales with u (bf16's u is 8x fp16's)
        assert 0.5 < b["rel_norm_u"] / a["rel_norm_u"] < 2.0, a["name"]
        assert 4.0 < b["rel_norm"] / a["rel_norm"] < 16.0, a["name"]


def test_demo_targets_fp16_below_bf16_everywhere_fp32_orders_below(setup):
    runs = {n: doctor.replay(*setup["engines"][n], setup["batch"], n, 1.0) for n in ("fp32", "fp16", "bf16")}
    for f32, f16, b16 in zip(*(runs[n]["layers"] for n in ("fp32", "fp16", "bf16")), strict=True):
        if b16["rel_norm"] == 0:  # the first input norm: bitwise equal in every precision
            assert f16["rel_norm"] == 0 and f32["rel_norm"] == 0
            continue
        assert f16["rel_norm"] < b16["rel_norm"], f16["name"]
        assert f32["rel_norm"] < f16["rel_norm"] / 100, f32["name"]
    assert all(runs[n]["first_flagged"] is None for n in runs)  # a clean engine: rounding noise only


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("param, expected", [
    ("model.layers.1.input_layernorm.weight", "layers.1.input_layernorm"),
    ("model.layers.1.mlp.down_proj.weight", "layers.1.mlp"),
    ("model.layers.0.self_attn.o_proj.weight", "layers.0.self_attn"),
])
def test_planted_fault_is_the_first_flagged_point(setup, name, param, expected):
    eng, trainer = setup["engines"][name]
    with doctor.planted_fault(eng.model, param, 1.0 + 1e-2):  # 1% on one weight of the rollout engine only
        r = doctor.replay(eng, trainer, setup["batch"], name, 1.0)
    assert r["first_flagged"] == expected, [(x["name"], round(x["rel_norm_u"], 2)) for x in r["layers"]]
    clean = doctor.replay(eng, trainer, setup["batch"], name, 1.0)  # restored on exit
    assert clean["first_flagged"] is None


def test_planted_fault_unknown_parameter():
    with pytest.raises(KeyError, match="no parameter"):
        with doctor.planted_fault(torch.nn.Linear(2, 2), "nope"):
            pass


def test_divergence_never_small_for_nonfinite():
    b = torch.ones(1, 2, 3)
    a = b.clone()
    a[0, 1, 0] = float("inf")
    d = doctor.divergence(a, b, torch.ones(1, 2))
    assert not d["finite"] and d["rel_norm"] == float("inf")
    assert doctor.divergence(a, b, torch.tensor([[1, 0]]))["rel_norm"] == 0.0  # the inf is at a masked token


def test_parse_precisions():
    assert parse_precisions("bf16", ()) == ["fp32", "bf16"]
    assert parse_precisions(None, ["fp16", "fp32"]) == ["fp32", "fp16"]
    with pytest.raises(ConfigError, match="'precision'.*fp99.*allowed"):
        parse_precisions("fp16,fp99", ())


@pytest.mark.parametrize("override, what", [("policy.backend=megatron", "policy.backend=megatron"),
                                            ("rollout.backend=vllm", "rollout.backend=vllm")])
def test_unsupported_backends_refused_before_work(tmp_path, override, what):
    cfg = load_recipe("mismatch_tiny", [f"output_dir={tmp_path}/x", override, "device=cpu"])
    with pytest.raises(ConfigError, match=f"{what} is not supported yet") as e:
        run_doctor(cfg, console=QUIET)
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "x").exists()


