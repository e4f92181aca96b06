"""Micro-batches trimmed to their own length: columns that are padding in every row are not computed.

A step's batch is padded to its widest prompt (left) and longest response (right); a micro-batch
of shorter rows would otherwise run at that global width. `trim` drops the leading prompt columns
no row of the micro-batch uses and the trailing response columns where every row has ended
(`response_mask` 0); `untrim` puts the response log-probs back at the batch's width (0 in the
dropped columns, which are masked everywhere). Positions are unchanged (`cumsum(mask) - 1` does
not see all-padding leading columns) and causal attention cannot see trailing columns.
"""

from __future__ import annotations

import dataclasses

import torch

from nemo_rl_fp16.interfaces import RolloutBatch

__all__ = ["trim", "untrim"]


def trim(mb: RolloutBatch) -> RolloutBatch:
    """The micro-batch without its all-padding leading prompt columns and trailing response columns.

    Args:
        mb: a micro-batch (`[n, P + T]`, the `interfaces.RolloutBatch` layout).

    Returns:
        A batch of width `P' + T'` (`1 <= P' <= P`, `1 <= T' <= T`) whose real tokens, response
        mask and rollout experts are those of `mb`; `mb` itself when nothing can be dropped.
    """
    p, t = mb.prompt_width, mb.response_mask.shape[1]
    used = mb.attention_mask[:, :p].bool().any(0)
    lead = int(used.int().argmax()) if bool(used.any()) else p - 1
    lead = min(lead, p - 1)  # keep one prompt column: token P is scored from position P - 1
    ended = mb.response_mask.bool().any(0)
    keep = int(ended.nonzero().max()) + 1 if bool(ended.any()) else 1
    if lead == 0 and keep == t:
        return mb
    cols = slice(lead, p + keep)
    return dataclasses.replace(
        mb, input_ids=mb.input_ids[:, cols], attention_mask=mb.attention_mask[:, cols],
        response_mask=mb.response_mask[:, :keep], rollout_logp=mb.rollout_logp[:, :keep], prompt_width=p - lead,
        rollout_experts=None if mb.rollout_experts is None else mb.rollout_experts[:, :keep])


def untrim(logp: torch.Tensor, width: int) -> torch.Tensor:
    """`[n, T']` log-probs of a trimmed micro-batch at the batch's response width `T` (0 on the right).

    Args:
        logp: `[n, T']` log-probs.
        width: T.

    Returns:
        `[n, T]` (with grad through the kept columns); `logp` itself when `T' == T`.
    """
    extra = width - logp.shape[1]
    return torch.nn.functional.pad(logp, (0, extra)) if extra else logp
