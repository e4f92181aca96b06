"""Torch backend memory: log-probs chunked along T and layer recompute (`policy.activation_checkpointing`),
both bitwise equal to the plain computation (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.modeling import logprobs as lp_mod
from nemo_rl_fp16.modeling.logprobs import chunked_token_logprobs, token_logprobs
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy

VOCAB = 64
DENSE = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 64, "rope_theta": 5000.0, "tie_word_embeddings": False}}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_logprobs_and_grads_bitwise(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    base = (4 * torch.randn(5, 7, 1000, generator=g)).to(dtype)
    tokens = torch.randint(0, 1000, (5, 7), generator=g)
    w = torch.randn(5, 7, generator=g)
    out = []
    for c in (None, chunk):
        x = base.clone().requires_grad_(True)
        y = token_logprobs(x, tokens, 0.7) if c is None else chunked_token_logprobs(x, tokens, 0.7, chunk=c)
        (y * w).sum().backward()
        out.append((y.detach(), x.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _loss(batch):
    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(1))
    mask = batch.response_mask.float()
    return lambda logp, rows: (-(logp * adv[rows, None] * mask[rows]).sum() / mask.sum(), {})


def _run(monkeypatch, chunk_elements=None, **kw):
    if chunk_elements is not None:
        monkeypatch.setattr(lp_mod, "LOGPROB_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    tr = TorchPolicy(DENSE, PrecisionPolicy.from_name("fp16"), lr=1e-2, micro_batch_size=3, seed=2, **kw)
    b = synthetic_batch(VOCAB, 6, 5, 7)
    tr.layer_calls = 0

    def count(*_):
        tr.layer_calls += 1

    tr.compute.model.layers[0].mlp.register_forward_pre_hook(count)  # inside the recomputed region
    lp = tr.logprobs(b, 0.8)
    res = [tr.train_step(b, _loss(b), 0.8) for _ in range(2)]
    return tr, lp, [r.grad_norm for r in res], {k: v.clone() for k, v in tr.master.state_dict().items()}


def test_torch_policy_chunked_logprobs_bitwise(monkeypatch):
    _, lp0, gn0, w0 = _run(monkeypatch)
    _, lp1, gn1, w1 = _run(monkeypatch, chunk_elements=3 * 2 * VOCAB)  # 2 positions per chunk of a 3-row micro-batch
    assert torch.equal(lp0, lp1) and gn0 == gn1 and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_activation_checkpointing_recomputes_layers_bitwise(monkeypatch):
    plain, lp0, gn0, w0 = _run(monkeypatch)
    tr, lp1, gn1, w1 = _run(monkeypatch, activation_checkpointing=True)
    # 2 micro-batches: scoring runs each layer once, each training step twice with recompute
    assert (plain.layer_calls, tr.layer_calls) == (2 + 2 * 2, 2 + 2 * 2 * 2)
    layers = [m for m in tr.compute.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len([m for m in layers if type(m).__name__.endswith("DecoderLayer")]) == 2
    assert not any(m.training for m in tr.compute.modules() if type(m).__name__.endswith("Attention"))
    assert torch.equal(lp0, lp1) and gn0 == gn1 and all(torch.equal(w0[k], w1[k]) for k in w0)
