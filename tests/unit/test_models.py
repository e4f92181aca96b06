"""Shared model helpers: building (config / local checkpoint), weight copies, positions,
response log-probs, and the fp16 activation range monitor."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.modeling import build_model, load_weights_, position_ids_from_mask, response_logprobs, token_logprobs
from nemo_rl_fp16.precision.range_monitor import ActivationMonitor

CFG = {"config": {"model_type": "qwen2", "vocab_size": 48, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}}


def test_build_from_config_casts_params_keeps_rope_fp32_and_is_seeded():
    m16 = build_model(CFG, torch.float16, seed=3)
    assert {p.dtype for p in m16.parameters()} == {torch.float16}
    assert {b.dtype for b in m16.buffers() if b.is_floating_point()} == {torch.float32}  # RoPE inv_freq
    assert not m16.training
    m32 = build_model(CFG, torch.float32, seed=3)
    other = build_model(CFG, torch.float32, seed=4)
    sd16, sd32 = m16.state_dict(), m32.state_dict()
    assert all(torch.equal(sd16[k], sd32[k].half()) for k in sd32)  # one rounding of the same fp32 init
    assert not torch.equal(sd32["lm_head.weight"], other.state_dict()["lm_head.weight"])


def test_build_from_local_checkpoint_and_clear_errors(tmp_path):
    src = build_model(CFG, torch.float32, seed=5)
    src.save_pretrained(tmp_path / "ckpt")
    loaded = build_model({"name_or_path": str(tmp_path / "ckpt")}, torch.bfloat16)
    assert all(torch.equal(v, src.state_dict()[k].bfloat16()) for k, v in loaded.state_dict().items())
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_model({"name_or_path": str(tmp_path / "does-not-exist")}, torch.float32)
    with pytest.raises(ValueError, match="exactly one"):
        build_model({"name_or_path": str(tmp_path / "ckpt"), **CFG}, torch.float32)
    with pytest.raises(ValueError, match="model_type"):
        build_model({"config": {"vocab_size": 8}}, torch.float32)


def test_load_weights_validates_everything_before_copying():
    model = build_model(CFG, torch.float16, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = build_model(CFG, torch.float32, seed=1).state_dict()
    bad = dict(good)
    bad.pop("model.norm.weight")
    bad["model.extra.weight"] = torch.zeros(1)
    bad["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        load_weights_(model, bad)
    msg = str(err.value)
    assert "model.norm.weight" in msg and "model.extra.weight" in msg and "lm_head.weight" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    load_weights_(model, good)
    assert all(torch.equal(v, good[k].half()) for k, v in model.state_dict().items())


def test_position_ids_from_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_response_logprobs_matches_manual_full_forward():
    model = build_model(CFG, torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 48, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of a short prompt
    mask[1, -2:] = 0  # response padding after EOS
    p = 4
    with torch.no_grad():
        got = response_logprobs(model, ids, mask, p, temperature=0.7)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        want = torch.log_softmax(logits[:, p - 1:-1].float() / 0.7, -1).gather(-1, ids[:, p:, None])[..., 0]
        greedy = response_logprobs(model, ids, mask, p, temperature=0.0)
    assert got.shape == (3, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(greedy, token_logprobs(logits[:, p - 1:-1], ids[:, p:], 1.0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        response_logprobs(model, ids, mask, 0, 1.0)


def test_token_logprobs_are_fp32_from_fp16_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]]).half()
    lp = token_logprobs(logits, torch.tensor([2]), 2.0)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.log_softmax(torch.tensor([[0.5, 1.0, 1.5]]), -1)[:, 2])


def test_activation_monitor_records_layer_maxima_and_removes_hooks():
    model = build_model(CFG, torch.float16, seed=0)
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with ActivationMonitor(model) as mon:
            out = model(input_ids=ids, output_hidden_states=True)
        m = mon.metrics()
        model(input_ids=ids)  # hooks are gone: no further updates
    assert mon.metrics() == m
    assert m["range/act_absmax/layer0"] == out.hidden_states[1].abs().max().item()
    assert m["range/act_absmax"] == max(m["range/act_absmax/layer0"], m["range/act_absmax/layer1"])
    assert m["range/fp16_headroom"] == pytest.approx(65504.0 / m["range/act_absmax"])
    assert m["range/act_nonfinite"] == 0.0
    assert ActivationMonitor(model).metrics() == {}


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_activation_monitor_headroom_is_unsafe_on_nonfinite_activations(bad):
    """An fp16 overflow in a layer's output reads as headroom 0 ("unsafe"), never inf/NaN or a
    reassuring number from the finite layers."""
    model = build_model(CFG, torch.float16, seed=0)
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(0))

    def plant(_module, _inputs, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        h[0, 0, 0] = bad

    mon = ActivationMonitor(model)
    handle = mon.layers[1].register_forward_hook(plant)  # registered first: runs before the monitor's hook
    with torch.no_grad(), mon:
        model(input_ids=ids)
    handle.remove()
    m = mon.metrics()
    assert m["range/act_nonfinite"] >= 1 and m["range/act_absmax/layer0"] < 65504  # layer 0 looked fine
    assert m["range/fp16_headroom"] == 0.0
