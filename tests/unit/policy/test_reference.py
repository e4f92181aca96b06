"""The KL reference π_ref is forward-only (weights in param_dtype; no master, optimizer or grads) and scores
bitwise as the full policy engine built from the same weights did, on both backends."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.policy.reference import ReferencePolicy, build_reference
from nemo_rl_fp16.precision import PrecisionPolicy

VOCAB = 64
DENSE = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 64, "rope_theta": 5000.0, "tie_word_embeddings": False}}
MOE = {"config": {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "norm_topk_prob": True, "max_position_embeddings": 64, "tie_word_embeddings": False}}


def _rc(backend="torch", precision="fp16"):
    return typed(load_recipe("sanity_tiny", [f"policy.backend={backend}", f"precision={precision}",
                                             "policy.micro_batch_size=4"]))


def _init(cfg):
    hf = build_model(cfg, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return {k: v.detach().clone() for k, v in hf.state_dict().items()}


def _check_frozen(ref: ReferencePolicy, dtype: torch.dtype, full_bytes: int):
    params = list(ref.compute.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert {p.dtype for p in params} == {dtype}
    assert not hasattr(ref, "optimizer") and not hasattr(ref, "train_step")
    assert ref.num_bytes() * (4 // dtype.itemsize) == full_bytes  # one param_dtype copy, no fp32 master
    assert ref.audit() == []


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_torch_reference_is_forward_only_and_bitwise(cfg, precision):
    rc = _rc(precision=precision)
    pol = PrecisionPolicy.from_name(precision)
    sd = _init(cfg)
    full = TorchPolicy(cfg, pol, lr=1e-3, micro_batch_size=4, initial_state_dict=sd)
    ref = build_reference(rc, cfg, pol, "cpu", sd)
    b = synthetic_batch(VOCAB, 6, 5, 7)
    for temp in (1.0, 0.7):
        assert torch.equal(ref.logprobs(b, temp), full.logprobs(b, temp))
    _check_frozen(ref, pol.param_dtype, sum(p.numel() * 4 for p in full.master.parameters()))


def test_megatron_reference_is_forward_only_and_bitwise(mcore_cpu):
    from conftest import reset_megatron

    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

    pol = PrecisionPolicy.from_name("fp16")
    sd = _init(DENSE)
    full = MegatronPolicy(DENSE, pol, lr=1e-3, micro_batch_size=4, initial_state_dict=sd)
    b = synthetic_batch(VOCAB, 6, 5, 7)
    want = full.logprobs(b, 0.7)
    full_bytes = sum(p.numel() * 4 for p in full.master.parameters())
    del full
    reset_megatron()
    ref = build_reference(_rc("megatron"), DENSE, pol, "cpu", sd)
    assert torch.equal(ref.logprobs(b, 0.7), want)
    _check_frozen(ref, torch.float16, full_bytes)
    fwd = MegatronPolicy(DENSE, pol, lr=1e-3, forward_only=True, initial_state_dict=sd)
    with pytest.raises(RuntimeError, match="forward-only"):
        fwd.train_step(b, lambda lp, rows: (lp.sum(), {}), 1.0)
