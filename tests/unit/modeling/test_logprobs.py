"""Log-prob math (`modeling/logprobs.py`): positions from left-padded masks, response and token log-probs in fp32."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.modeling import build_model, position_ids_from_mask, response_logprobs, token_logprobs
from nemo_rl_fp16.modeling.logprobs import chunked_token_logprobs

CFG = {"config": {"model_type": "qwen2", "vocab_size": 48, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}}


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


# chunked along T (issue 20): the same values and gradients as the whole computation
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
