"""fp16 preflight: activation headroom per layer, gradient underflow at the initial loss scale, refuse."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16 import preflight as pf
from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.precision import PrecisionPolicy


@pytest.fixture(scope="module")
def tiny():
    from nemo_rl_fp16.assembly import build_tokenizer
    from nemo_rl_fp16.data import get_dataset

    rc = typed(load_recipe("sanity_tiny", ["warm_start.enabled=false"]))
    tok = build_tokenizer(rc)
    prompts = [tok(p.prompt)["input_ids"] for p in get_dataset(rc.data.model_dump(), seed=0)[:4]]
    return {"rc": rc, "tok": tok, "prompts": prompts, "model_cfg": rc.model.model_dump()}


def _run(tiny, model, scale=2.0**16):
    return pf.preflight(model, tiny["prompts"], pad_token_id=tiny["tok"].pad_token_id, initial_scale=scale,
                        global_rows=256, micro_rows=64, max_new_tokens=6, seed=0)


def test_headroom_bits_never_safe_for_nonfinite():
    assert pf.headroom_bits(65504 / 8) == pytest.approx(3.0)
    assert pf.headroom_bits(0.0) == math.inf
    for bad in (math.inf, math.nan):
        assert pf.headroom_bits(bad) == -math.inf


def test_clean_model_is_safe(tiny):
    r = _run(tiny, build_model(tiny["model_cfg"], torch.float32, seed=0))
    assert r["safe"] and not r["problems"], r["problems"]
    assert [x["layer"] for x in r["layers"]] == ["embeddings", "layers.0", "layers.1", "norm", "logits"]
    assert all(x["headroom_bits"] > pf.HEADROOM_MIN_BITS for x in r["layers"])
    assert r["gradients"]["underflow_frac"] <= pf.UNDERFLOW_MAX_FRAC and r["gradients"]["n_elements"] > 1000
    assert "ok" in pf.summary_line(r)


def test_planted_large_activation_names_the_layer(tiny):
    model = build_model(tiny["model_cfg"], torch.float32, seed=0)
    with torch.no_grad():  # the MLP of block 1 now writes > 1e4 into the residual stream
        model.model.layers[1].mlp.down_proj.weight.mul_(1e6)
    r = _run(tiny, model)
    assert not r["safe"]
    assert r["problems"][0].startswith("layers.1: max |activation|"), r["problems"]
    hit = next(x for x in r["layers"] if x["layer"] == "layers.1")
    assert hit["max_abs"] > 1e4 and hit["headroom_bits"] < pf.HEADROOM_MIN_BITS
    assert hit["where"] in ("layers.1", "layers.1.mlp", "layers.1.mlp.down_proj")  # the block output: residual + MLP
    assert all(x["headroom_bits"] > pf.HEADROOM_MIN_BITS for x in r["layers"] if x["layer"] in ("embeddings", "layers.0"))
    assert "bf16" in pf.fix_hint(r) and "UNSAFE" in pf.summary_line(r)


def test_nonfinite_activation_is_unsafe(tiny):
    model = build_model(tiny["model_cfg"], torch.float32, seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = math.inf
    r = _run(tiny, model)
    assert not r["safe"] and r["problems"][0].startswith("layers.0: non-finite activation")
    assert "non-finite" in pf.summary_line(r)


def test_underflowing_loss_scale_is_flagged_with_a_recommended_scale(tiny):
    model = build_model(tiny["model_cfg"], torch.float32, seed=0)
    r = _run(tiny, model, scale=2.0**-20)
    g = r["gradients"]
    assert g["underflow_frac"] > 0.1 and not r["safe"]
    assert "underflow fp16" in r["problems"][0] and r["problems"][0].startswith(("layers.", "model.", "lm_head"))
    rec = g["recommended_scale"]
    assert math.log2(rec).is_integer() and 65504 / 4 < g["max_abs"] * rec <= 65504 / 2
    assert g["underflow_frac_at_recommended"] < g["underflow_frac"]
    assert pf.fix_hint(r) == f"set precision.loss_scale.initial_scale={rec:g}"
    assert model.model.layers[0].mlp.up_proj.weight.grad is None  # gradients left cleared


def test_at_run_start_modes(tiny):
    buf = io.StringIO()
    console = Console(file=buf, width=300)
    setup = SimpleNamespace(policy=SimpleNamespace(), train_policy=PrecisionPolicy.from_name("fp16"))
    rc = typed(load_recipe("sanity_tiny", ["precision.preflight=warn"]))
    assert pf.at_run_start(rc, setup, console) is None and "skipped" in buf.getvalue()  # no master model here
    with pytest.raises(ConfigError, match="precision.preflight=refuse.*not support") as e:
        pf.at_run_start(typed(load_recipe("sanity_tiny", ["precision.preflight=refuse"])), setup, console)
    assert len(str(e.value).splitlines()) == 1
    # the megatron trainer in this process (CPU rehearsal or one GPU): its master is no HF model, skipped in one line
    mega = SimpleNamespace(policy=SimpleNamespace(master=torch.nn.Linear(2, 2)), train_policy=setup.train_policy)
    buf.truncate(0)
    rc_mega = typed(load_recipe("sanity_tiny", ["policy.backend=megatron", "device=cpu"]))
    assert pf.at_run_start(rc_mega, mega, console) is None
    assert "preflight (fp16): skipped (policy.backend=megatron is not supported yet)" in buf.getvalue()
    bf16 = SimpleNamespace(policy=None, train_policy=PrecisionPolicy.from_name("bf16"))
    assert pf.at_run_start(typed(load_recipe("sanity_tiny", ["precision.preflight=refuse"])), bf16, console) is None
    with pytest.raises(ConfigError, match="precision.preflight"):
        load_recipe("sanity_tiny", ["precision.preflight=maybe"])


