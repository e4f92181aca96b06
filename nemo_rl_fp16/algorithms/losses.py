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

Micro-batching and data parallelism: the normalisers of a reduction (valid tokens, valid
sequences) are those of the whole optimizer batch, passed as ``global_valid_toks`` /
``global_valid_seqs`` (NeMo-RL's ``LossFunction`` convention), so each call returns its rows'
exact share and the shares of all micro-batches on all data-parallel ranks sum to the full-batch
loss, gradient and metrics (``combine_metrics``). Nothing outside the loss reweights it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nemo_rl_fp16.algorithms.kl import kl_penalty

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
#: |log r| bound applied before ``exp`` of a trainer log-ratio (``grpo`` token ratios, ``gspo``
#: sequence ratios): r ∈ [e^-20, e^20] ≈ [2.1e-9, 4.9e8]. Without it a log-ratio past ~88 gives
#: r = inf in fp32 and a NaN gradient (0·inf) even where the loss is finite. Same bound as verl's
#: ``compute_policy_loss`` and this package's k3 KL (``kl.K3_LOG_RATIO_CLAMP``). Past the bound the
#: ratio is constant (zero gradient through it): a ratio of e^20 is far outside any clip range.
LOG_RATIO_CLAMP = 20.0


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
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    global_valid_toks: float | Tensor | None = None,
    global_valid_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped / importance-sampled policy-gradient loss and its metrics.

    Algorithms:

    * ``grpo``: l_it = −min(r_it·A_i, clip(r_it, 1−clip_low, 1+clip_high)·A_i), reduced by
      ``reduction``: ``token_mean`` = Σ m·l / Σ m; ``seq_mean_token_mean`` =
      mean_i(Σ_t m·l / Σ_t m); ``seq_mean_token_sum`` = mean_i Σ_t m·l.
    * ``gspo``: s_i = exp(mean over masked t of (logp − old_logp));
      l_i = −min(s_i·A_i, clip(s_i, 1−clip_low, 1+clip_high)·A_i); loss = mean_i l_i.
    * ``pg_seq_is``: ρ_i = exp(Σ_t m·(logp − rollout_logp)), detached;
      l_i = −ρ_i·A_i·Σ_t m·logp; loss = mean_i l_i, so ∂loss/∂logp_it = −ρ_i·A_i·m_it / N_seq.

    "mean_i" is over valid sequences (at least one masked token), N_seq of them; Σ m over the
    batch is N_tok. With ``global_valid_seqs`` / ``global_valid_toks`` these are the counts of
    the whole optimizer batch (all micro-batches, all data-parallel ranks) and the call returns
    this slice's share: the sums over its own rows divided by the global counts.

    KL to a reference (``kl_coef`` > 0 with ``ref_logp``): loss += kl_coef · Σ m·k_it / N_tok,
    k_it = ``kl.kl_penalty(logp, ref_logp, mask, kl_kind)`` (KL(π‖ref) per token, a token mean
    for every algorithm and reduction, normalised by the same global N_tok).

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
    * Empty rows (no masked token) are not valid sequences: they contribute 0 and are not
      counted. A batch with no masked token gives loss 0 (still attached to the graph).
    * ``gspo`` and ``pg_seq_is`` are sequence-level and ignore ``reduction`` (it is still
      validated). With ``[B, T]`` advantages they use A_i = masked token mean of A_it.
    * Sequence log-weights are summed in the compute dtype and MIS compares in log space
      (log ρ_i ≤ log is_cap), so a log-ratio of ±1000 gives weight 0 (or a tiny weight), never
      ``inf·0 = NaN``. TIS evaluates min(exp(x), cap) as exp(min(x, log cap)).
    * ``pg_seq_is`` without MIS clamps log ρ_i at ``PG_SEQ_IS_MAX_LOG_WEIGHT`` (20). This departs
      from the unbiased definition only where ρ_i > e^20, where the estimate is dominated by one
      sample anyway and would otherwise overflow to inf (then inf·0 = NaN in the gradient).
      Use ``correction="mis"`` for a principled bound.
    * ``grpo`` token and ``gspo`` sequence log-ratios are clamped to ±``LOG_RATIO_CLAMP`` (20)
      before ``exp`` (as verl does): every finite input gives a finite, NaN-free gradient. This
      changes the loss only where |log r| > 20 (r > 4.9e8 or < 2.1e-9), where the ratio then
      stops moving (zero gradient through it).

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
        ref_logp (Tensor | None): ``[B, T]`` log π_ref; needed when ``kl_coef`` > 0.
        kl_coef (float): weight (≥ 0) of the KL(π‖ref) token mean added to the loss.
        kl_kind (str): ``k1`` | ``k2`` | ``k3`` estimator of that KL.
        global_valid_toks (float | Tensor | None): N_tok of the whole optimizer batch;
            None = this call's Σ m (the call is the whole batch).
        global_valid_seqs (float | Tensor | None): N_seq of the whole optimizer batch;
            None = this call's count of rows with a masked token.

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
        ``kl_to_ref`` (the KL token mean, without ``kl_coef``; only when ``kl_coef`` > 0).
        Means and fractions are shares like the loss (this slice's sum / the global count), so
        ``combine_metrics`` sums them; ``*_max`` / ``*_min`` are over this slice's units and are
        left out when the slice has none but the batch has some. Over an empty batch they take
        the neutral value (1.0 for ratios/weights, 0.0 for fractions and KL).

    Raises:
        ValueError: unknown algorithm / correction / reduction / KL kind, invalid pairing, bad
            shapes, negative clip, non-positive ``is_cap``, negative ``kl_coef`` or global count,
            missing ``rollout_logp`` / ``ref_logp`` when needed.
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

    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef > 0")

    shape = tuple(logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {shape}")
    use_kl = kl_coef > 0
    named = {"old_logp": old_logp, "rollout_logp": rollout_logp, "mask": mask,
             "ref_logp": ref_logp if use_kl else None}
    for name, x in named.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {tuple(x.shape)}")
    inputs = [logp, old_logp, advantages] + ([rollout_logp] if rollout_logp is not None else [])
    cdt = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32

    m = mask != 0
    mf = m.to(cdt)
    lengths = mf.sum(-1)
    nonempty = lengths > 0
    n_tok = _global_count("global_valid_toks", global_valid_toks, lengths.sum())
    n_seq = _global_count("global_valid_seqs", global_valid_seqs, nonempty.sum().to(cdt))
    logp_c = logp.to(cdt)  # one cast: both terms' gradients add up in cdt before the cast back
    lp = _masked(logp_c, m, cdt)
    old = _masked(old_logp.detach(), m, cdt)
    roll = _masked(rollout_logp.detach(), m, cdt) if rollout_logp is not None else None
    adv_tok, adv_seq = _advantages(advantages, m, lengths, cdt)
    log_cap = math.log(is_cap)
    stats = _Stats(n_tok, n_seq)

    seq_w = None
    if correction == "mis" and algorithm != "pg_seq_is":
        log_rho = ((old - roll) * mf).sum(-1)
        seq_w = _mis_weight(log_rho, log_cap, nonempty, stats)

    if algorithm == "grpo":
        ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        unclipped = ratio * adv_tok
        clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_tok
        per_tok = -torch.minimum(unclipped, clipped)
        stats.mean("clip_fraction", ((clipped < unclipped) & m)[m].to(cdt), "tok")
        stats.ratio(ratio.detach()[m], "tok")
        if correction == "tis":
            tok_w = torch.exp((old - roll).clamp(max=log_cap))
            per_tok = per_tok * tok_w
            stats.weight(tok_w[m], "tok")
        elif seq_w is not None:
            per_tok = per_tok * seq_w[:, None]
        else:
            stats.weight(lengths.new_ones(int(m.sum())), "tok")
        loss = _reduce(per_tok * mf, lengths, nonempty, reduction, n_tok, n_seq)
    elif algorithm == "gspo":
        mean_lr = ((lp - old) * mf).sum(-1) / lengths.clamp(min=1.0)
        s = torch.exp(mean_lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        unclipped = s * adv_seq
        clipped = s.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_seq
        per_seq = torch.where(nonempty, -torch.minimum(unclipped, clipped), 0.0)
        stats.mean("clip_fraction", ((clipped < unclipped) & nonempty)[nonempty].to(cdt), "seq")
        stats.ratio(s.detach()[nonempty], "seq")
        if seq_w is not None:
            per_seq = per_seq * seq_w
        else:
            stats.weight(lengths.new_ones(int(nonempty.sum())), "seq")
        loss = per_seq.sum() / n_seq.clamp(min=1.0)
    else:  # pg_seq_is
        stats.mean("clip_fraction", lengths.new_zeros(int(m.sum())), "tok")
        stats.ratio(torch.exp((lp.detach() - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))[m], "tok")
        log_rho = ((lp.detach() - roll) * mf).sum(-1)
        if correction == "mis":
            rho = _mis_weight(log_rho, log_cap, nonempty, stats)
        else:
            rho = torch.exp(log_rho.clamp(max=PG_SEQ_IS_MAX_LOG_WEIGHT))
            stats.weight(rho[nonempty], "seq")
        per_seq = -rho * adv_seq * (lp * mf).sum(-1)
        loss = per_seq.sum() / n_seq.clamp(min=1.0)
    if correction != "mis":
        stats.mean("mis_masked_fraction", lengths.new_zeros(int(nonempty.sum())), "seq")
    if use_kl:
        kl_tok = kl_penalty(logp_c, ref_logp.detach().to(cdt), m, kind=kl_kind)
        kl = kl_tok.sum() / n_tok.clamp(min=1.0)
        loss = loss + kl_coef * kl
        stats.metrics["kl_to_ref"] = float(kl.detach())
    return loss, stats.metrics


def combine_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """One step's loss metrics from its micro-batches' (all data-parallel ranks) metric dicts.

    Shares (``policy_loss`` called with the global normalisers) are summed; ``*_max`` keys take
    the max and ``*_min`` keys the min over the parts that report them.

    Args:
        parts (list[dict[str, float]]): one ``policy_loss`` metrics dict per micro-batch.

    Returns:
        dict[str, float]: the whole batch's metrics (empty for no parts).
    """
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            if k not in out:
                out[k] = float(v)
            elif k.endswith("_max"):
                out[k] = max(out[k], float(v))
            elif k.endswith("_min"):
                out[k] = min(out[k], float(v))
            else:
                out[k] += float(v)
    return out


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


def _global_count(name: str, given: float | Tensor | None, local: Tensor) -> Tensor:
    """The normaliser as a 0-dim tensor of ``local``'s (compute) dtype: ``given`` or ``local``."""
    if given is None:
        return local
    value = float(given)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite count >= 0, got {given!r}")
    return torch.tensor(value, dtype=local.dtype, device=local.device)


class _Stats:
    """Metrics as shares of the global counts (see ``policy_loss`` Returns)."""

    def __init__(self, n_tok: Tensor, n_seq: Tensor):
        self.counts = {"tok": float(n_tok), "seq": float(n_seq)}
        self.metrics: dict[str, float] = {}

    def mean(self, key: str, x: Tensor, unit: str, neutral: float = 0.0) -> None:
        n = self.counts[unit]
        self.metrics[key] = float(x.detach().double().sum()) / n if n else neutral

    def extreme(self, key: str, x: Tensor, unit: str, neutral: float, fn) -> None:
        if x.numel():
            self.metrics[key] = float(fn(x.detach()))
        elif not self.counts[unit]:
            self.metrics[key] = neutral

    def ratio(self, x: Tensor, unit: str) -> None:
        self.mean("ratio_mean", x, unit, 1.0)
        self.extreme("ratio_max", x, unit, 1.0, torch.max)
        self.extreme("ratio_min", x, unit, 1.0, torch.min)

    def weight(self, w: Tensor, unit: str) -> None:
        self.mean("is_weight_mean", w, unit, 1.0)
        self.extreme("is_weight_max", w, unit, 1.0, torch.max)


def _mis_weight(log_rho: Tensor, log_cap: float, nonempty: Tensor, stats: _Stats) -> Tensor:
    """w_i = ρ_i·1[ρ_i ≤ cap] computed in log space (no overflow); records MIS metrics."""
    keep = log_rho <= log_cap
    w = torch.where(keep, torch.exp(log_rho.clamp(max=log_cap)), 0.0)
    stats.mean("mis_masked_fraction", (~keep)[nonempty].to(w.dtype), "seq")
    stats.weight(w[nonempty], "seq")
    return w


def _reduce(masked_loss: Tensor, lengths: Tensor, nonempty: Tensor, reduction: str, n_tok: Tensor,
            n_seq: Tensor) -> Tensor:
    if reduction == "token_mean":
        return masked_loss.sum() / n_tok.clamp(min=1.0)
    row_sum = masked_loss.sum(-1)
    if reduction == "seq_mean_token_mean":
        row_sum = torch.where(nonempty, row_sum / lengths.clamp(min=1.0), 0.0)
    return row_sum.sum() / n_seq.clamp(min=1.0)
