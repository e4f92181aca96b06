"""Mismatch doctor: hook alignment, unit-roundoff scaling, planted faults, the command and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16 import doctor
from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.doctor_report import parse_precisions, run_doctor
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.precision import PrecisionPolicy

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope="module")
def reference(setup):
    """Both fp32 paths' outputs on the setup batch: each point's rounding reference."""
    return doctor.replay(*setup["engines"]["fp32"], setup["batch"], "fp32", 1.0)["outputs"]


@pytest.mark.parametrize("side", ["rollout", "trainer"])
@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("param, expected", [
    ("model.layers.1.input_layernorm.weight", "layers.1.input_layernorm"),
    ("model.layers.1.mlp.down_proj.weight", "layers.1.mlp"),
    ("model.layers.0.self_attn.o_proj.weight", "layers.0.self_attn"),
])
def test_planted_fault_is_the_first_flagged_point(setup, reference, name, param, expected, side):
    eng, trainer = setup["engines"][name]
    trainer.weights.sync_compute()  # the compute copy is current: the fault below stays for the replay
    model = eng.model if side == "rollout" else trainer.compute
    with doctor.planted_fault(model, param, 1.0 + 1e-2):  # 1% on one weight of one engine only
        r = doctor.replay(eng, trainer, setup["batch"], name, 1.0, reference=reference)
    seen = [(x["name"], round(x["ratio"] or 0, 2)) for x in r["layers"]]
    assert r["first_flagged"] == expected, seen
    # a clear margin both ways, in bf16 too (a 1% fault is only ~2.6 bf16 roundings): the planted point sits well
    # above the flag level (fp16: ~9-18x), every point before it well below
    at = next(i for i, x in enumerate(r["layers"]) if x["name"] == expected)
    assert r["layers"][at]["ratio"] > (1.2 if name == "bf16" else 5.0) * doctor.NOISE_RATIO, seen
    assert all(x["ratio"] is None or x["ratio"] < doctor.NOISE_RATIO / 1.5 for x in r["layers"][:at]), seen
    clean = doctor.replay(eng, trainer, setup["batch"], name, 1.0, reference=reference)  # restored on exit
    assert clean["first_flagged"] is None
    assert max(x["ratio"] or 0 for x in clean["layers"]) < doctor.NOISE_RATIO / 1.5


def test_planted_fault_bf16_block_in_fp16_engine(setup, reference):
    """Another kind of fault: one block of the fp16 rollout engine computed in bf16 (weights rounded to bf16)."""
    eng, trainer = setup["engines"]["fp16"]
    layer = eng.model.model.layers[1]
    saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    try:
        r = doctor.replay(eng, trainer, setup["batch"], "fp16", 1.0, reference=reference)
    finally:
        layer.load_state_dict(saved)
    # the norm weights of the random init are all 1.0, exact in bf16: the block parts first at its attention
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert r["first_flagged"] == "layers.1.self_attn", [(x["name"], x["ratio"]) for x in r["layers"]]


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


@pytest.mark.parametrize("override, what", [
    ("policy.backend=megatron policy.use_distributed_optimizer=true",
     "'policy.use_distributed_optimizer': true on CPU"),  # the megatron trainer's own device check
    ("rollout.backend=vllm", "rollout.backend=vllm needs vLLM"),  # not installed here
])
def test_unsupported_backends_refused_before_work(tmp_path, override, what):
    if "vllm" in override and _has_vllm():
        pytest.skip("vLLM is installed: nothing to refuse")
    cfg = load_recipe("mismatch_tiny", [f"output_dir={tmp_path}/x", *override.split(), "device=cpu"])
    with pytest.raises(ConfigError, match=what) as e:
        run_doctor(cfg, console=QUIET)
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class StandInVllm:
    """What the doctor gets from vLLM: `generate` (tokens and the engine's own log µ) and `shutdown`; no model
    to hook (vLLM runs it inside its worker). Backed by a torch engine so the test runs without vLLM."""

    def __init__(self, inner):
        self._inner, self.shut = inner, False

    def generate(self, prompts, params):
        return self._inner.generate(prompts, params)

    def shutdown(self):
        self.shut = True


def test_doctor_with_vllm_compares_logprobs_and_says_what_it_cannot_see(tmp_path, monkeypatch):
    from nemo_rl_fp16 import doctor_report, rollout

    monkeypatch.setattr(doctor_report, "_vllm_missing", lambda: None)
    real, made = rollout.build_rollout_engine, []

    def stand_in(rc, policy, *args, **kwargs):
        assert rc.rollout.backend == "vllm"
        torch_rc = rc.model_copy(update={"rollout": rc.rollout.model_copy(update={"backend": "torch"})})
        made.append(StandInVllm(real(torch_rc, policy, *args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(rollout, "build_rollout_engine", stand_in)
    cfg = load_recipe("mismatch_tiny", [f"output_dir={tmp_path}", "rollout.backend=vllm", "mismatch.num_prompts=4",
                                        "rollout.max_new_tokens=8", "device=cpu"])
    report = run_doctor(cfg, ["fp32", "bf16"], console=QUIET)
    runs = report["precisions"]
    assert len(made) == 2 and all(e.shut for e in made)  # one engine per precision, each shut down
    for r in runs.values():
        assert r["layers"] == [] and r["first_flagged"] is None and r["unseen"] == doctor.VLLM_UNSEEN
        assert r["samples"]["tokens"] > 0
    # the log-probs it can see: the engine's own log µ vs the trainer's log π, bf16 far from fp32's floor
    assert 0 < runs["fp32"]["logp_gap"]["mean"] < runs["bf16"]["logp_gap"]["mean"] / 100
    md = (tmp_path / "doctor" / "report.md").read_text()
    assert md.count("**Not visible**: vLLM runs the model inside its own worker") == 1
    assert "## Per layer" not in md and "each precision's own vLLM engine" in md
    assert (tmp_path / "doctor" / "divergence_vs_layer.png").stat().st_size > 1000


def test_planted_fault_script_names_the_layer(tmp_path, capsys):
    """scripts/doctor_planted_fault.py: run_doctor(plant=...) plants the fault in every precision but the fp32
    reference and the report says so."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("planted", ROOT / "scripts" / "doctor_planted_fault.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rc = script.main(["recipe=mismatch_tiny", "model.layers.1.input_layernorm.weight", "1.01", "precision=bf16",
                      f"output_dir={tmp_path}", "mismatch.num_prompts=4", "rollout.max_new_tokens=8"])
    out = capsys.readouterr().out
    assert rc == 0 and "fp32: first flagged none" in out and "bf16: first flagged layers.1.input_layernorm (" in out
    report = json.loads((tmp_path / "doctor" / "report.json").read_text())
    assert report["planted_fault"] == {"param": "model.layers.1.input_layernorm.weight", "scale": 1.01}
    assert "**Planted fault**" in (tmp_path / "doctor" / "report.md").read_text()
    assert script.main(["recipe=mismatch_tiny", "model.nope", "1.01", f"output_dir={tmp_path}/b"]) == 2
