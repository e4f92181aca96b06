"""HF model building (`modeling/hf.py`): from a config or a local checkpoint, dtype casts, seeded init, validated weight copies."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.modeling import build_model, load_weights_

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
