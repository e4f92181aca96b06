"""The Megatron trainer computes the HF model, or refuses: one tiny config per HF config feature.

Mapped features: the megatron fp32 logits equal HF's (<= 1e-5) at every real position of rows
longer than the rope scaling's original length / the sliding window, and the refit state dict is
the HF one bitwise. Unmapped features: the refusal names the feature, before any model is built.
"""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.modeling import position_ids_from_mask
from nemo_rl_fp16.modeling.layout import ModelLayout

pytest.importorskip("megatron.core")

from test_policy import _mtrainer, _weights  # noqa: E402

VOCAB = 64
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
ORIGINAL = 8  # rope scaling's original context: the test rows (up to 24 tokens) go 3x beyond it
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}

MAPPED = {
    "rope llama3": {"model_type": "llama", "rope_parameters": LLAMA3},
    "rope llama3 (Llama 3.2 factor 32)": {"model_type": "llama", "rope_parameters": {**LLAMA3, "factor": 32.0}},
    "rope linear": {"model_type": "qwen2", "rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0,
                                                               "factor": 4.0}},
    "sliding window (mistral)": {"model_type": "mistral", "sliding_window": 5},
    "sliding window (qwen2, all layers)": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 6,
                                          "max_window_layers": 0},
    "attention_bias (o_proj.bias)": {"model_type": "llama", "attention_bias": True},
    "mlp_bias": {"model_type": "llama", "mlp_bias": True},
    "attention_bias + mlp_bias": {"model_type": "llama", "attention_bias": True, "mlp_bias": True},
    "qk norm + attention_bias (qwen3)": {"model_type": "qwen3", "attention_bias": True},
    "tied embeddings": {"model_type": "llama", "tie_word_embeddings": True, "rope_parameters": LLAMA3},
}


def _cfg(extra):
    return {"config": {**BASE, **extra}}


@pytest.mark.parametrize("feature", list(MAPPED))
def test_mapped_feature_logits_equal_hf_beyond_original_length(mcore_cpu, feature):
    cfg = _cfg(MAPPED[feature])
    hf, sd = _weights(cfg)
    batch = synthetic_batch(VOCAB, 3, 6, 18, seed=2)  # rows of 22-24 real tokens, one left-padded
    pos = position_ids_from_mask(batch.attention_mask)
    assert int(pos.max()) + 1 >= 3 * ORIGINAL
    tr = _mtrainer(cfg, init=sd)
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
        out = tr.master(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-5)
    back = tr.rollout_state_dict()  # the refit state dict carries every HF tensor (o_proj.bias, mlp biases)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_feature_really_changes_the_model():
    """The table above can fail: without the mapping (plain RoPE / full attention / no bias) HF's
    logits differ far beyond the tolerance."""
    base = ModelLayout.from_hf_config({**BASE, "model_type": "llama"})
    scaled = ModelLayout.from_hf_config({**BASE, **MAPPED["rope llama3"]})
    assert (scaled.rope_inv_freq() - base.rope_inv_freq()).abs().max() > 1e-2
    assert ModelLayout.from_hf_config({**BASE, "model_type": "mistral", "sliding_window": 5}).sliding_window == 5
    assert ModelLayout.from_hf_config({**BASE, "model_type": "mistral"}).sliding_window == 4096  # HF's default


@pytest.mark.parametrize("feature", ["sliding window (mistral)"])
def test_sdpa_attention_honours_the_sliding_window(mcore_cpu, feature):
    cfg = _cfg(MAPPED[feature])
    _, sd = _weights(cfg)
    batch = synthetic_batch(VOCAB, 3, 6, 18, seed=2)
    ref = _mtrainer(cfg, init=sd).logprobs(batch, 1.0)
    torch.testing.assert_close(_mtrainer(cfg, init=sd, attention="sdpa").logprobs(batch, 1.0), ref, rtol=0, atol=1e-5)


REFUSED = [
    ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                 "original_max_position_embeddings": ORIGINAL}}, "rope_type='yarn'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type='dynamic'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                 "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                                 "original_max_position_embeddings": ORIGINAL}},
     "rope_type='longrope'"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
     "layer_types"),
    ({"model_type": "qwen3_moe", "attention_bias": True, "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 32}, "attention_bias"),
    ({"model_type": "qwen2_moe"}, "qwen2_moe"),
    ({"model_type": "gemma"}, "model_type='gemma'"),
]


@pytest.mark.parametrize("extra,needle", REFUSED, ids=[n for _, n in REFUSED])
def test_unmapped_feature_is_refused_by_name(extra, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("'", "'")):
        ModelLayout.from_hf_config({**BASE, **extra})


def test_sliding_window_with_te_is_refused_by_name():
    from nemo_rl_fp16.policy.megatron.model import layer_spec

    lay = ModelLayout.from_hf_config({**BASE, **MAPPED["sliding window (mistral)"]})
    with pytest.raises(ValueError, match="sliding_window=5 with policy.attention=te"):
        layer_spec(lay, use_te=True)


def test_parallel_layout_rules():
    """TP > kv heads is allowed when TP is a multiple of them (megatron-core gathers K/V); vocab padding
    for TP is refused by name."""
    lay = ModelLayout.from_hf_config({**BASE, "model_type": "qwen2", "num_key_value_heads": 1})
    assert lay.parallel_problems(tp=2) == [] and lay.parallel_problems(tp=4) == []
    three = ModelLayout.from_hf_config({**BASE, "model_type": "qwen2", "num_attention_heads": 6, "head_dim": 16,
                                        "num_key_value_heads": 2})
    assert any("key/value heads (2)" in p for p in three.parallel_problems(tp=3))
    odd = ModelLayout.from_hf_config({**BASE, "model_type": "llama", "vocab_size": VOCAB + 1})
    assert any("vocab padding for TP" in p for p in odd.parallel_problems(tp=2))
