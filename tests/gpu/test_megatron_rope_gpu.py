"""A rope-scaled (llama3) config: megatron logits vs HF on CUDA, fp32 (TF32 off), local and SDPA attention.

Rows reach 4x beyond the scaling's `original_max_position_embeddings`, so a wrong inverse
frequency shows. Control: the same megatron model with the *unscaled* frequencies must differ
from HF by far more than the tolerance (the check can fail). Run by scripts/gpu_check.sh; prints
one `GPU-RESULT` line.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("megatron.core")

from nemo_rl_fp16.modeling import build_model, position_ids_from_mask  # noqa: E402
from nemo_rl_fp16.modeling.layout import ModelLayout  # noqa: E402
from nemo_rl_fp16.policy.megatron.model import unwrap  # noqa: E402
from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy  # noqa: E402
from nemo_rl_fp16.precision import PrecisionPolicy  # noqa: E402

VOCAB, ORIGINAL = 512, 64
CFG = {"config": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512,
                  "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                  "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": ORIGINAL}}}
TOL = 1e-4  # fp32 on CUDA without TF32: reduction order only


def test_rope_scaled_megatron_logits_equal_hf_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = build_model(CFG, torch.float32, seed=0)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    hf = hf.cuda().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (4, 4 * ORIGINAL), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :7] = 0  # one left-padded row
    ids, attn = ids.cuda(), attn.cuda()
    real = attn.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    errs = {}
    for attention in ("local", "sdpa"):
        tr = MegatronPolicy(CFG, PrecisionPolicy.from_name("fp32"), lr=1e-5, device="cuda", initial_state_dict=sd,
                            attention=attention)
        with torch.no_grad():
            out = tr.master(input_ids=ids, attention_mask=attn).logits.float()
            errs[attention] = (out[real] - ref[real]).abs().max().item()
            if attention == "sdpa":  # control: the unscaled frequencies are visibly wrong at these positions
                rope = unwrap(tr.master.module).rotary_pos_emb
                scaled = rope.inv_freq.clone()
                unscaled = {**CFG["config"], "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
                rope.inv_freq = ModelLayout.from_hf_config(unscaled).rope_inv_freq().to(scaled.device)
                type(rope).forward.cache_clear()  # megatron memoises the rotary table per sequence length
                wrong = tr.master(input_ids=ids, attention_mask=attn).logits.float()
                errs["control (unscaled rope)"] = (wrong[real] - ref[real]).abs().max().item()
                rope.inv_freq = scaled
                type(rope).forward.cache_clear()
        del tr
        torch.cuda.empty_cache()
    print(f"GPU-RESULT megatron vs HF logits, llama3 rope (factor 8, original {ORIGINAL}, rows to {4 * ORIGINAL}), "
          f"fp32 no TF32: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in errs.items()) + f" (tolerance {TOL:g})",
          flush=True)
    assert errs["local"] < TOL and errs["sdpa"] < TOL, errs
    assert errs["control (unscaled rope)"] > 10 * TOL, errs
