"""Policy-gradient losses: GRPO, GSPO, PG-Seq-IS, with TIS / MIS mismatch corrections.

Reference: "Defeating the Training-Inference Mismatch via FP16", https://arxiv.org/abs/2510.26788
(public code: sail-sg/Precision-RL). GSPO: https://arxiv.org/abs/2507.18071.

Notation, per token t of sequence i (all tensors ``[B, T]``):

* ``logp`` = log π_θ (trainer, carries the gradient), ``old_logp`` = log π_old (trainer, before
  this rollout's updates), ``rollout_logp`` = log µ (rollout engine), ``mask`` = m,
  ``advantages`` = A_i (``[B]``) or A_it (``[B, T]``).
* r_it = exp(logp − old_logp).

Everything is a pure function of explicit tensors. ``old_logp``, ``rollout_logp`` and
``advantages`` are treated as constants (detached); only ``logp`` receives a gradient.
Math runs in fp32 (fp64 if any input is fp64, so ``torch.autograd.gradcheck`` works) whatever the
input dtype, because fp16/bf16 exp/sum of log-ratios lose exactly the precision this package is
about.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALGORITHMS = ("grpo", "gspo", "pg_seq_is")
CORRECTIONS = ("none", "tis", "mis")
REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
#: Which correction each algorithm accepts; any other pairing is a config error.
VALID_PAIRINGS: dict[str, tuple[str, ...]] = {
    "grpo": ("none", "tis", "mis"),
    "gspo": ("none", "mis"),
    "pg_seq_is": ("none", "mis"),
}
#: Upper clamp on log ρ_i for ``pg_seq_is`` without MIS (ρ_i ≤ e^20 ≈ 4.9e8): the unbiased
#: sequence weight is unbounded and exp of a sequence sum overflows fp32 past ~88.
PG_SEQ_IS_MAX_LOG_WEIGHT = 20.0


def policy_loss(
    algorithm: str,
    logp: Tensor,
    old_logp: Tensor,
    rollout_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    correction: str = "none",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_cap: float = 2.0,
    reduction: str = "token_mean",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped / importance-sampled policy-gradient loss and its metrics.

    Algorithms:

    * ``grpo``: l_it = −min(r_it·A_i, clip(r_it, 1−clip_low, 1+clip_high)·A_i), reduced by
      ``reduction``: ``token_mean`` = Σ m·l / Σ m; ``seq_mean_token_mean`` =
      mean_i(Σ_t m·l / Σ_t m); ``seq_mean_token_sum`` = mean_i Σ_t m·l.
    * ``gspo``: s_i = exp(mean over masked t of (logp − old_logp));
      l_i = −min(s_i·A_i, clip(s_i, 1−clip_low, 1+clip_high)·A_i); loss = mean_i l_i.
    * ``pg_seq_is``: ρ_i = exp(Σ_t m·(logp − rollout_logp)), detached;
      l_i = −ρ_i·A_i·Σ_t m·logp; loss = mean_i l_i, so ∂loss/∂logp_it = −ρ_i·A_i·m_it / B.

    Corrections (``VALID_PAIRINGS``):

    * ``none``.
    * ``tis`` (``grpo`` only): l_it ← w_it·l_it, w_it = min(exp(old_logp − rollout_logp), is_cap).
    * ``mis`` (all): ρ_i = exp(Σ_t m·(old_logp − rollout_logp)) (``pg_seq_is``: its own ρ_i),
      w_i = ρ_i·1[ρ_i ≤ is_cap]; ``grpo`` multiplies every l_it of row i by w_i, ``gspo``
      multiplies l_i by w_i, ``pg_seq_is`` uses w_i in place of ρ_i. Sequences past the cap
      contribute nothing. All weights are detached.

    Edge cases and numerics:

    * Masked positions are replaced by 0 *before* any arithmetic (``torch.where``), so padding
      may hold anything (even inf/NaN) and gets an exact zero gradient.
    * Empty rows (no masked token) contribute 0. ``token_mean`` over an all-masked batch is 0
      (still attached to the graph). ``seq_mean_token_mean`` averages over non-empty rows only
      (0 if none); ``seq_mean_token_sum``, ``gspo`` and ``pg_seq_is`` average over all B rows,
      empty rows counting as 0.
    * ``gspo`` and ``pg_seq_is`` are sequence-level and ignore ``reduction`` (it is still
      validated). With ``[B, T]`` advantages they use A_i = masked token mean of A_it.
    * Sequence log-weights are summed in the compute dtype and MIS compares in log space
      (log ρ_i ≤ log is_cap), so a log-ratio of ±1000 gives weight 0 (or a tiny weight), never
      ``inf·0 = NaN``. TIS evaluates min(exp(x), cap) as exp(min(x, log cap)).
    * ``pg_seq_is`` without MIS clamps log ρ_i at ``PG_SEQ_IS_MAX_LOG_WEIGHT`` (20). This departs
      from the unbiased definition only where ρ_i > e^20, where the estimate is dominated by one
      sample anyway and would otherwise overflow to inf (then inf·0 = NaN in the gradient).
      Use ``correction="mis"`` for a principled bound.

    Args:
        algorithm (str): ``grpo`` | ``gspo`` | ``pg_seq_is``.
        logp (Tensor): ``[B, T]`` log π_θ, any float dtype; receives the gradient.
        old_logp (Tensor): ``[B, T]`` log π_old.
        rollout_logp (Tensor | None): ``[B, T]`` log µ; may be None only when unused
            (``correction="none"`` with ``grpo``/``gspo``).
        advantages (Tensor): ``[B]`` (broadcast over tokens) or ``[B, T]``.
        mask (Tensor): ``[B, T]`` bool or 0/1 float; nonzero = real response token.
        correction (str): ``none`` | ``tis`` | ``mis``.
        clip_low (float): lower clip ε (≥ 0); ratio clipped at 1 − clip_low.
        clip_high (float): upper clip ε (≥ 0); ratio clipped at 1 + clip_high.
        is_cap (float): TIS truncation / MIS masking threshold C (> 0).
        reduction (str): ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum``
            (``grpo`` only).

    Returns:
        tuple[Tensor, dict[str, float]]: the 0-dim loss in the compute dtype (fp32, or fp64 if any
        input is fp64) and detached python-float metrics:
        ``clip_fraction`` (fraction of masked tokens (``grpo``) / non-empty sequences (``gspo``)
        where the clipped term won the min and differed; 0 for ``pg_seq_is``),
        ``ratio_mean``/``ratio_max``/``ratio_min`` (token r_it over masked tokens for
        ``grpo``/``pg_seq_is``, s_i over non-empty sequences for ``gspo``),
        ``is_weight_mean``/``is_weight_max`` (w_it over masked tokens for TIS, w_i / ρ_i over
        non-empty sequences for MIS and ``pg_seq_is``; 1.0 otherwise),
        ``mis_masked_fraction`` (fraction of non-empty sequences with ρ_i > is_cap; 0 unless MIS).
        Statistics over an empty set take the neutral value (1.0 for ratios/weights, 0.0 for
        fractions).

    Raises:
        ValueError: unknown algorithm / correction / reduction, invalid pairing, bad shapes,
            negative clip or non-positive ``is_cap``, missing ``rollout_logp`` when needed.
    """
    _check_choice("algorithm", algorithm, ALGORITHMS)
    _check_choice("correction", correction, CORRECTIONS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if correction not in VALID_PAIRINGS[algorithm]:
        pairs = "; ".join(f"{a}: {', '.join(c)}" for a, c in VALID_PAIRINGS.items())
        raise ValueError(
            f"correction={correction!r} cannot be used with algorithm={algorithm!r}; "
            f"valid pairings (algorithm: corrections) are {pairs}"
        )
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if not is_cap > 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap}")
    needs_rollout = correction != "none" or algorithm == "pg_seq_is"
    if needs_rollout and rollout_logp is None:
        raise ValueError(
            f"rollout_logp is required for algorithm={algorithm!r}, correction={correction!r}"
        )

    shape = tuple(logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {shape}")
    named = {"old_logp": old_logp, "rollout_logp": rollout_logp, "mask": mask}
    for name, x in named.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {tuple(x.shape)}")
    inputs = [logp, old_logp, advantages] + ([rollout_logp] if rollout_logp is not None else [])
    cdt = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32

    m = mask != 0
    mf = m.to(cdt)
    lengths = mf.sum(-1)
    nonempty = lengths > 0
    lp = _masked(logp, m, cdt)
    old = _masked(old_logp.detach(), m, cdt)
    roll = _masked(rollout_logp.detach(), m, cdt) if rollout_logp is not None else None
    adv_tok, adv_seq = _advantages(advantages, m, lengths, cdt)
    log_cap = math.log(is_cap)
    metrics = {"clip_fraction": 0.0, "is_weight_mean": 1.0, "is_weight_max": 1.0,
               "mis_masked_fraction": 0.0}

    seq_w = None
    if correction == "mis" and algorithm != "pg_seq_is":
        log_rho = ((old - roll) * mf).sum(-1)
        seq_w = _mis_weight(log_rho, log_cap, nonempty, metrics)

    if algorithm == "grpo":
        ratio = torch.exp(lp - old)
        unclipped = ratio * adv_tok
        clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_tok
        per_tok = -torch.minimum(unclipped, clipped)
        metrics["clip_fraction"] = _frac((clipped < unclipped) & m, m)
        _ratio_stats(ratio.detach()[m], metrics)
        if correction == "tis":
            tok_w = torch.exp((old - roll).clamp(max=log_cap))
            per_tok = per_tok * tok_w
            _weight_stats(tok_w[m], metrics)
        elif seq_w is not None:
            per_tok = per_tok * seq_w[:, None]
        loss = _reduce(per_tok * mf, lengths, nonempty, reduction)
    elif algorithm == "gspo":
        s = torch.exp(((lp - old) * mf).sum(-1) / lengths.clamp(min=1.0))
        unclipped = s * adv_seq
        clipped = s.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_seq
        per_seq = torch.where(nonempty, -torch.minimum(unclipped, clipped), 0.0)
        metrics["clip_fraction"] = _frac((clipped < unclipped) & nonempty, nonempty)
        _ratio_stats(s.detach()[nonempty], metrics)
        if seq_w is not None:
            per_seq = per_seq * seq_w
        loss = per_seq.sum() / max(per_seq.shape[0], 1)
    else:  # pg_seq_is
        _ratio_stats(torch.exp(lp.detach() - old)[m], metrics)
        log_rho = ((lp.detach() - roll) * mf).sum(-1)
        if correction == "mis":
            rho = _mis_weight(log_rho, log_cap, nonempty, metrics)
        else:
            rho = torch.exp(log_rho.clamp(max=PG_SEQ_IS_MAX_LOG_WEIGHT))
            _weight_stats(rho[nonempty], metrics)
        per_seq = -rho * adv_seq * (lp * mf).sum(-1)
        loss = per_seq.sum() / max(per_seq.shape[0], 1)
    return loss, metrics


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed values: {', '.join(allowed)}")


def _masked(x: Tensor, m: Tensor, cdt: torch.dtype) -> Tensor:
    """Cast to ``cdt`` and zero masked-out positions without ever touching their values."""
    return torch.where(m, x.to(cdt), torch.zeros((), dtype=cdt, device=x.device))


def _advantages(adv: Tensor, m: Tensor, lengths: Tensor, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Return (per-token ``[B, T]``, per-sequence ``[B]``) advantages, zero where masked/empty."""
    adv = adv.detach().to(cdt)
    b, t = m.shape
    if adv.shape == (b,):
        return _masked(adv[:, None].expand(b, t), m, cdt), adv
    if adv.shape == (b, t):
        tok = _masked(adv, m, cdt)
        return tok, tok.sum(-1) / lengths.clamp(min=1.0)
    raise ValueError(f"advantages must be [B]=({b},) or [B, T]=({b}, {t}), got {tuple(adv.shape)}")


def _mis_weight(log_rho: Tensor, log_cap: float, nonempty: Tensor, metrics: dict) -> Tensor:
    """w_i = ρ_i·1[ρ_i ≤ cap] computed in log space (no overflow); records MIS metrics."""
    keep = log_rho <= log_cap
    w = torch.where(keep, torch.exp(log_rho.clamp(max=log_cap)), 0.0)
    metrics["mis_masked_fraction"] = _frac(~keep & nonempty, nonempty)
    _weight_stats(w[nonempty], metrics)
    return w


def _reduce(masked_loss: Tensor, lengths: Tensor, nonempty: Tensor, reduction: str) -> Tensor:
    if reduction == "token_mean":
        return masked_loss.sum() / lengths.sum().clamp(min=1.0)
    row_sum = masked_loss.sum(-1)
    if reduction == "seq_mean_token_sum":
        return row_sum.sum() / max(row_sum.shape[0], 1)
    row_mean = torch.where(nonempty, row_sum / lengths.clamp(min=1.0), 0.0)
    return row_mean.sum() / nonempty.sum().clamp(min=1).to(row_mean.dtype)


def _frac(hits: Tensor, among: Tensor) -> float:
    n = int(among.sum())
    return float(hits.sum()) / n if n else 0.0


def _ratio_stats(x: Tensor, metrics: dict) -> None:
    empty = x.numel() == 0
    metrics["ratio_mean"] = 1.0 if empty else float(x.mean())
    metrics["ratio_max"] = 1.0 if empty else float(x.max())
    metrics["ratio_min"] = 1.0 if empty else float(x.min())


def _weight_stats(w: Tensor, metrics: dict) -> None:
    if w.numel():
        metrics["is_weight_mean"] = float(w.detach().mean())
        metrics["is_weight_max"] = float(w.detach().max())
