"""Token log-probs from logits, the one definition both engines use (π and µ alike).

Layout (`interfaces.RolloutBatch`): response token `P + t` is predicted by the logits at position
`P + t - 1`; log-probs are fp32 log-softmax of `logits / T` (the cast before the division).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

#: fp32 elements of one log-prob chunk (`[rows, positions, vocab]`, 2^26 = 256 MiB): `chunked_token_logprobs`
LOGPROB_CHUNK_ELEMENTS = 1 << 26


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: a padded row is positioned as if unpadded.

    Args:
        attention_mask: `[N, S]`, 1 on real tokens.

    Returns:
        `[N, S]` int64 `cumsum(mask) - 1`, clamped at 0 (padding positions get 0).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def effective_temperature(temperature: float) -> float:
    """The temperature log-probs use: greedy decoding (0) is scored at temperature 1.

    Args:
        temperature: the sampling temperature.

    Returns:
        `temperature`, or 1.0 for 0.

    Raises:
        ValueError: a negative temperature.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return 1.0 if temperature == 0 else float(temperature)


def logprob_table(logits: torch.Tensor, temperature: float,
                  logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log softmax(logits / T) over the vocabulary, in `logits_dtype` (fp32), from low-precision logits.

    The cast happens before the temperature division, identically in both engines; greedy
    decoding (T = 0) is scored at T = 1. vLLM's `processed_logprobs` is the same quantity.

    Args:
        logits: `[..., V]` in the model dtype (fp16/bf16/fp32).
        temperature: the sampling temperature (0: greedy, scored at 1).
        logits_dtype: the policy's `logits_dtype` (fp32 in every preset).

    Returns:
        `[..., V]` natural-log probabilities in `logits_dtype`.
    """
    return torch.log_softmax(logits.to(logits_dtype) / effective_temperature(temperature), dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`logprob_table(...)[token]`: the log-prob of each given token.

    Args:
        logits: `[..., V]` logits.
        tokens: `[...]` int64 token ids, one per logits row.
        temperature: as `logprob_table`.
        logits_dtype: as `logprob_table`.

    Returns:
        `[...]` log-probs in `logits_dtype`.
    """
    return logprob_table(logits, temperature, logits_dtype).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def same_function_modes() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`torch.utils.checkpoint` `context_fn`: recompute under the torch-function modes of the forward.

    The CPU numerics (`precision.cpu_numerics`: `TorchFunctionMode`s) are not active when autograd
    recomputes a checkpointed region in backward, so the recompute would take other kernels and
    other values (checkpoint refuses the mismatch). This re-enters the forward's modes that are
    not already active, so the recompute is the same computation.

    Returns:
        (the forward's context: a no-op, the recompute's context).
    """
    from torch.overrides import _get_current_function_mode_stack

    modes = list(_get_current_function_mode_stack())

    @contextlib.contextmanager
    def again():
        active = {id(m) for m in _get_current_function_mode_stack()}
        with contextlib.ExitStack() as stack:
            for m in modes:
                if id(m) not in active:
                    stack.enter_context(m)
            yield

    return contextlib.nullcontext(), again()


def chunked_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                           logits_dtype: torch.dtype = torch.float32, chunk: int | None = None) -> torch.Tensor:
    """`token_logprobs` over chunks of positions: no `[N, T, V]` fp32 tensor is ever whole.

    The fp32 cast, the division and the log-softmax of `token_logprobs` each make an `[N, T, V]`
    fp32 tensor (3 at the peak; autograd keeps the log-softmax output). Here they exist for
    `chunk` positions at a time, and with grad each chunk is recomputed in backward
    (`torch.utils.checkpoint`), so only the model-dtype logits stay alive. Every row's log-softmax
    is the same computation as unchunked: results and gradients are bitwise equal.

    Args:
        logits: `[N, T, V]` logits in the model dtype.
        tokens: `[N, T]` int64 token ids.
        temperature: as `logprob_table`.
        logits_dtype: as `logprob_table`.
        chunk: positions per chunk (None: as many as fit `LOGPROB_CHUNK_ELEMENTS` fp32 elements).

    Returns:
        `[N, T]` log-probs in `logits_dtype` (with grad if `logits` has it).
    """
    n, t, v = logits.shape
    if chunk is None:
        chunk = max(1, LOGPROB_CHUNK_ELEMENTS // max(n * v, 1))
    if chunk >= t:
        return token_logprobs(logits, tokens, temperature, logits_dtype)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for s in range(0, t, chunk):
        args = (logits[:, s:s + chunk], tokens[:, s:s + chunk], temperature, logits_dtype)
        pieces.append(checkpoint(token_logprobs, *args, use_reentrant=False, context_fn=same_function_modes)
                      if recompute else token_logprobs(*args))
    return torch.cat(pieces, dim=1)


def response_width(input_ids: torch.Tensor, prompt_width: int) -> int:
    """T, the response width of a `[N, P + T]` batch.

    Args:
        input_ids: `[N, P + T]` token ids.
        prompt_width: P.

    Returns:
        T.

    Raises:
        ValueError: P < 1 or T < 1.
    """
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
    The fp32 log-softmax runs in chunks of positions (`chunked_token_logprobs`, bitwise the same).

    Args:
        model: an HF causal LM (or one with the same forward signature and `.logits`).
        input_ids: `[N, P + T]` int64, the `RolloutBatch` layout.
        attention_mask: `[N, P + T]`, 1 on real tokens.
        prompt_width: P.
        temperature: the rollout's sampling temperature.
        logits_dtype: the policy's `logits_dtype`.

    Returns:
        `[N, T]` log π in `logits_dtype`, with grad if the caller enabled it.

    Raises:
        ValueError: P < 1 or no response column.
    """
    n_resp = response_width(input_ids, prompt_width)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                logits_to_keep=n_resp + 1)
    return chunked_token_logprobs(out.logits[:, :-1], input_ids[:, prompt_width:], temperature, logits_dtype)
