"""Sequence packing (`policy.sequence_packing`): sorted micro-batches, each row laid out compactly.

A step's batch (`interfaces.RolloutBatch`) pads every prompt on the left to the widest prompt P and
every response on the right to the longest T, so a row costs `P + T` positions while its real
tokens are `p_i + r_i`. Trimming (`trim.py`) removes the columns a whole micro-batch does not use;
a micro-batch still costs `max p_i + max r_i` per row. Packing removes the rest:

1. **Sorted micro-batches** (`packed_slices`): each data-parallel rank sorts *its own* rows by
   real length `p_i + r_i` (longest first, stable) and forms micro-batches of
   `policy.micro_batch_size` neighbours. Every rank has the same number of rows, hence the same
   number of micro-batches: FSDP2 runs its collectives per micro-batch and cannot see a different
   count (no all-reduce of the count is needed).
2. **Compact layout** (`compact`): each row's real tokens (one contiguous run: the prompt then the
   response) start at column 0, padding on the right; the micro-batch is `max_i (p_i + r_i)` wide.
   Row i's response token j sits at column `p_i + j`; the micro-batch is handed to the backend's
   scorer as a `RolloutBatch` with `prompt_width = min_i p_i`, so the scorer returns log-probs of
   columns `min p .. W - 1` and `uncompact` takes row i's from offset `p_i - min p`.
   Response mask, rollout log-probs and recorded experts (MoE replay, `moe_routing.replay_targets`
   puts column c's experts at position `prompt_width - 1 + c`, i.e. `p_i + j - 1`) are shifted by
   the same per-row offset; -1 (the router's own choice) on the prompt columns, as unpacked.

Why this and not several sequences per row (NeMo-RL / verl "packing": reset positions and a
block-diagonal causal mask): each row's positions (`cumsum(mask) - 1` on the HF path, the
megatron wrapper's rotation: a left-aligned row needs none) and causal context are exactly the
unpacked ones, so the per-row math is unchanged and only the kernels' reduction shapes differ
(fp32 rounding, `tests/unit/policy/test_packing.py`); it needs no varlen attention kernel (flash
varlen / Transformer Engine THD, which the CPU paths and the local megatron spec do not have), and
the micro-batch count per rank stays `ceil(rows / micro_batch_size)`. At the recipes' micro-batch
sizes sorted neighbours differ little in length: `benchmarks/packing.py` measures the positions
run per real token (docs/scaling.md). Cost not counted there: the lm_head also runs on the
`p_i - min p` prompt positions of each row (discarded), a few % of a token's FLOPs.

Results come back in the original row order (`MicroBatchLoop` scatters them); the loss closure
receives the micro-batch's original row indices, so its per-row inputs (advantages, masks,
rollout log-probs, groups) line up and the global normalisers are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from nemo_rl_fp16.interfaces import RolloutBatch

__all__ = ["PACKED", "PACKING_WITH_CPU_EP", "PACKING_WITH_PP", "Compact", "compact", "in_row_order", "packed_slices", "real_lengths",
           "uncompact"]

#: `RolloutBatch.extras` key of a packed forward's batch: the `Compact` it came from (expert recording reads it)
PACKED = "sequence_packing"

#: the refusal of `policy.sequence_packing` with pipeline parallelism (validation stage and the megatron policy)
PACKING_WITH_PP = ("bad value for 'policy.sequence_packing': true with policy.pipeline_parallel_size > 1; allowed: "
                   "false (the pipeline schedule sends every micro-batch at the batch's width); "
                   "set policy.sequence_packing=false or policy.pipeline_parallel_size=1")


#: the refusal of `policy.sequence_packing` where megatron's CPU (rehearsal) allgather MoE dispatcher spans DP ranks
PACKING_WITH_CPU_EP = ("bad value for 'policy.sequence_packing': true with a MoE expert-parallel group across "
                       "data-parallel ranks on CPU; allowed: false (megatron's allgather dispatcher on CPU needs "
                       "equal token counts over the group); set policy.sequence_packing=false")


def real_lengths(batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Real prompt and response lengths of each row.

    Args:
        batch: `[N, P + T]` rows (`interfaces.RolloutBatch` layout).

    Returns:
        (`[N]` int64 prompt lengths `p_i` = real tokens in the first P columns, `[N]` int64 response
        lengths `r_i` = real tokens after them).
    """
    p = batch.prompt_width
    m = batch.attention_mask.long()
    return m[:, :p].sum(-1), m[:, p:].sum(-1)


def packed_slices(batch: RolloutBatch, rows: slice, micro_batch_size: int) -> Iterator[torch.Tensor]:
    """`rows` sorted by real length (longest first, stable), in micro-batches of neighbours.

    Args:
        batch: the whole batch.
        rows: this rank's contiguous rows (`MicroBatchLoop.slices`' span).
        micro_batch_size: rows per micro-batch (>= 1).

    Yields:
        `[n_mb]` int64 row indices into `batch` (`n_mb = micro_batch_size` except maybe the last);
        `ceil(len(rows) / micro_batch_size)` of them, whatever the lengths.
    """
    lo, hi = rows.start, rows.stop
    prompt, response = real_lengths(batch.select(rows))
    order = torch.sort(prompt + response, descending=True, stable=True).indices + lo
    for start in range(0, hi - lo, micro_batch_size):
        yield order[start:start + micro_batch_size]


@dataclasses.dataclass
class Compact:
    """A micro-batch in the compact layout and what `uncompact` needs to undo it.

    Attributes:
        batch: `[n, W]` rows, real tokens left-aligned (module doc), `prompt_width = min p_i`.
        offsets: `[n]` int64 `p_i - min p`: row i's response token j is column `offsets[i] + j`
            of the scorer's `[n, W - min p]` log-probs.
        width: T, the original response width.
        rows: the micro-batch's row indices into the whole batch (None: not given).
    """

    batch: RolloutBatch
    offsets: torch.Tensor
    width: int
    rows: torch.Tensor | None = None

    def restore(self, x: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """A per-response-column tensor of the compact batch back in the original response layout.

        Args:
            x: `[n, W - min p, ...]` values of the compact batch's response columns (log-probs,
                recorded expert ids).
            fill: the value of columns past the compact width (masked ones).

        Returns:
            `[n, T, ...]`: row i's column j is `x[i, offsets[i] + j]` (a gather: differentiable).
        """
        return _shift(x, -self.offsets, self.width, fill)


def _shift(x: torch.Tensor, offsets: torch.Tensor, width: int, fill) -> torch.Tensor:
    """`out[i, c] = x[i, c - offsets[i]]` for `0 <= c - offsets[i] < T`, else `fill`; `[n, width, ...]`."""
    n, t = x.shape[:2]
    c = torch.arange(width, device=x.device)[None, :] - offsets.to(x.device)[:, None]  # [n, width]
    ok = (c >= 0) & (c < t)
    src = c.clamp(0, t - 1)
    idx = src.reshape(n, width, *([1] * (x.dim() - 2))).expand(n, width, *x.shape[2:])
    out = x.gather(1, idx)
    okx = ok.reshape(n, width, *([1] * (x.dim() - 2)))
    return torch.where(okx, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def compact(mb: RolloutBatch, rows: torch.Tensor | None = None) -> Compact:
    """The micro-batch with each row's real tokens left-aligned and the width cut to the longest row.

    Args:
        mb: `n` rows of `[P + T]` (`interfaces.RolloutBatch` layout: one contiguous run of real
            tokens per row, prompt left-padded, response right-padded).
        rows: `mb`'s row indices in the whole batch, kept in `Compact.rows` and, with the `Compact`
            itself, in the compact batch's `extras[PACKED]`.

    Returns:
        The `Compact` micro-batch: `input_ids` / `attention_mask` `[n, W]` with
        `W = max_i (p_i + r_i)`, `prompt_width = min_i p_i` (>= 1), `response_mask`,
        `rollout_logp` and `rollout_experts` `[n, W - min p, ...]` shifted right by `offsets`
        (0 / -1 elsewhere); `prompt_index` as `mb`'s; `extras` `mb`'s plus `PACKED`.

    Raises:
        ValueError: a row with no prompt token, or a response-mask entry outside the row's real tokens.
    """
    prompt, response = real_lengths(mb)
    if bool((prompt < 1).any()):
        raise ValueError("sequence packing: a row has no prompt token (attention_mask is 0 on all prompt columns)")
    ended = torch.arange(mb.response_mask.shape[1], device=response.device)[None, :] >= response[:, None]
    if bool((mb.response_mask.bool() & ended.to(mb.response_mask.device)).any()):
        raise ValueError("sequence packing: response_mask is 1 on a column past the row's real tokens "
                         "(attention_mask 0); the batch does not follow the RolloutBatch layout")
    p, total = mb.prompt_width, mb.input_ids.shape[1]
    lengths = prompt + response
    w, pmin = int(lengths.max()), int(prompt.min())
    w = max(w, pmin + 1)  # at least one response column
    col = torch.arange(w, device=mb.input_ids.device)[None, :]
    src = (col + (p - prompt).to(col.device)[:, None]).clamp(max=total - 1)  # compact c = original P - p_i + c
    real = col < lengths.to(col.device)[:, None]
    ids = mb.input_ids.gather(1, src)
    attn = torch.where(real, mb.attention_mask.gather(1, src), torch.zeros_like(ids))
    offsets = prompt - pmin
    rw = w - pmin
    experts = None if mb.rollout_experts is None else _shift(mb.rollout_experts, offsets, rw, -1)
    batch = dataclasses.replace(
        mb, input_ids=ids, attention_mask=attn.to(mb.attention_mask.dtype), prompt_width=pmin,
        response_mask=_shift(mb.response_mask, offsets, rw, 0), rollout_logp=_shift(mb.rollout_logp, offsets, rw, 0.0),
        rollout_experts=experts)
    out = Compact(batch, offsets, mb.response_mask.shape[1], rows)
    out.batch = dataclasses.replace(batch, extras={**mb.extras, PACKED: out})
    return out


def uncompact(logp: torch.Tensor, packed: Compact) -> torch.Tensor:
    """The scorer's log-probs of a compact micro-batch back in the original `[n, T]` response layout.

    Args:
        logp: `[n, W - min p]` log-probs of the compact batch's response columns (any float dtype).
        packed: the `Compact` they were scored from.

    Returns:
        `[n, T]`, row i's column j = `logp[i, offsets[i] + j]`, 0 past the compact width (those
        columns are masked); differentiable (a gather).
    """
    return packed.restore(logp, 0.0)


def in_row_order(parts: list[torch.Tensor], rows: list[slice | torch.Tensor | None]) -> torch.Tensor:
    """Concatenate per-micro-batch results and put them back in row order (packed rows are permuted).

    Args:
        parts: `[n_mb, ...]` results of each micro-batch, in the order they ran.
        rows: each micro-batch's rows: a slice or None (in order already) or int64 row indices.

    Returns:
        `[sum n_mb, ...]` in increasing row order.
    """
    out = torch.cat(parts)
    if all(r is None or isinstance(r, slice) for r in rows):
        return out
    idx = torch.cat([r.cpu() for r in rows])
    return out[idx.argsort().to(out.device)]  # out[m] is row idx[m]
