"""Token log-probs from logits, the one definition both engines use (π and µ alike).

Layout (`interfaces.RolloutBatch`): response token `P + t` is predicted by the logits at position
`P + t - 1`; log-probs are fp32 log-softmax of `logits / T` (the cast before the division).
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`cumsum(mask) - 1` clamped at 0: a left-padded row is positioned as if unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def effective_temperature(temperature: float) -> float:
    """The temperature log-probs use: greedy decoding (0) is scored at temperature 1."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return 1.0 if temperature == 0 else float(temperature)


def logprob_table(logits: torch.Tensor, temperature: float,
                  logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log softmax(logits / T) over the vocabulary, in `logits_dtype` (fp32), from low-precision logits.

    The cast happens before the temperature division, identically in both engines; greedy
    decoding (T = 0) is scored at T = 1.
    """
    return torch.log_softmax(logits.to(logits_dtype) / effective_temperature(temperature), dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`logprob_table(...)[token]`: the log-prob of each given token."""
    return logprob_table(logits, temperature, logits_dtype).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_width(input_ids: torch.Tensor, prompt_width: int) -> int:
    """T, the response width of a `[N, P + T]` batch (checked: P >= 1, T >= 1)."""
    n_resp = input_ids.shape[1] - prompt_width
    if prompt_width < 1 or n_resp < 1:
        raise ValueError(f"need prompt_width >= 1 and a response, got P={prompt_width}, width {input_ids.shape[1]}")
    return n_resp


def response_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_width: int, temperature: float,
                      logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[N, T]` log-probs of the response tokens from one full-sequence forward (the trainer's π).

    Token `P + t` is predicted by the logits at position `P + t - 1`; only those T positions
    reach the lm_head (`logits_to_keep`). Padding is not zeroed: callers honour response_mask.
    """
    n_resp = response_width(input_ids, prompt_width)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                logits_to_keep=n_resp + 1)
    return token_logprobs(out.logits[:, :-1], input_ids[:, prompt_width:], temperature, logits_dtype)
