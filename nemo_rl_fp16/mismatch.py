"""Training-inference mismatch metrics between the trainer π and the rollout engine µ.

Reference: "Defeating the Training-Inference Mismatch via FP16", https://arxiv.org/abs/2510.26788
(Fig. 2: KL(µ‖π) by response length, ~24x smaller in FP16 than in BF16).

Tokens are sampled from µ, so KL(µ‖π) is estimated with p = π (``train_logp``) and q = µ
(``rollout_logp``): log r = train_logp − rollout_logp, k1 = −log r, k3 = r − 1 − log r
(:func:`nemo_rl_fp16.algorithms.kl.kl_estimate`). The same metric names are logged by the
trainer every step and by the offline ``mismatch`` command; the report writer lives in
:mod:`nemo_rl_fp16.report` and is re-exported here as ``write_report`` (imported lazily so this
module does not pull in matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from nemo_rl_fp16.algorithms.kl import kl_estimate

#: Response-length bucket upper edges for ``mismatch/kl_by_length/<lo>-<hi>``.
DEFAULT_LENGTH_BUCKETS = (64, 256, 1024, 4096)
#: ``is_ratio_max`` is exp(max log-ratio) with the log clamped here so it stays a finite float64
#: (JSON / TensorBoard cannot carry inf); e^700 ≈ 1e304 already says "degenerate".
IS_RATIO_MAX_LOG_CLAMP = 700.0
PREFIX = "mismatch/"


def _as_tensor(x: Any) -> Tensor:
    return x.detach() if isinstance(x, Tensor) else torch.as_tensor(x)


def _prepare(train_logp: Any, rollout_logp: Any, mask: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Validate shapes; return float64 train/rollout log-probs zeroed where masked, bool mask."""
    train, roll, m = (_as_tensor(x) for x in (train_logp, rollout_logp, mask))
    if train.dim() != 2 or train.shape != roll.shape or train.shape != m.shape:
        raise ValueError(
            "train_logp, rollout_logp and mask must share one [N, T] shape, got "
            f"{tuple(train.shape)}, {tuple(roll.shape)}, {tuple(m.shape)}"
        )
    m = m != 0
    zero = torch.zeros((), dtype=torch.float64, device=train.device)
    train = torch.where(m, train.to(torch.float64), zero)
    roll = torch.where(m, roll.to(torch.float64), zero)
    return train, roll, m


def bucket_edges(length_buckets: Sequence[int]) -> list[tuple[int, float, str]]:
    """Turn upper edges (b_0 < b_1 < …) into inclusive integer buckets.

    Buckets are [1, b_0], [b_0+1, b_1], …, [b_{n−1}+1, ∞), named ``"1-64"``, ``"65-256"``, …,
    ``"4097-inf"``.

    Args:
        length_buckets (Sequence[int]): strictly increasing positive upper edges.

    Returns:
        list[tuple[int, float, str]]: (lo, hi, name) per bucket; ``hi`` is ``math.inf`` last.

    Raises:
        ValueError: empty, non-positive, non-integer or not strictly increasing edges.
    """
    edges = list(length_buckets)
    ok = bool(edges) and all(isinstance(b, int) and not isinstance(b, bool) for b in edges)
    if not ok or edges[0] < 1 or any(a >= b for a, b in pairwise(edges)):
        raise ValueError(
            f"length_buckets must be strictly increasing positive ints, got {length_buckets!r}"
        )
    out, lo = [], 1
    for hi in edges:
        out.append((lo, float(hi), f"{lo}-{hi}"))
        lo = hi + 1
    out.append((lo, math.inf, f"{lo}-inf"))
    return out


def sequence_logratios(train_logp: Any, rollout_logp: Any, mask: Any) -> Tensor:
    """Σ_t m·(train_logp − rollout_logp) for each non-empty sequence (float64, ``[n_nonempty]``).

    Args:
        train_logp (Any): `[n, T]` log π (tensor or array-like).
        rollout_logp (Any): `[n, T]` log µ of the same tokens.
        mask (Any): `[n, T]` response mask (nonzero = valid token).

    Returns:
        Tensor: `[n_nonempty]` float64 sums of the masked per-token log-ratios.
    """
    train, roll, m = _prepare(train_logp, rollout_logp, mask)
    return (train - roll).sum(-1)[m.any(-1)]


def mismatch_metrics(
    train_logp: Any,
    rollout_logp: Any,
    mask: Any,
    *,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    train_experts: Any = None,
    rollout_experts: Any = None,
    is_cap: float = 2.0,
) -> dict[str, float]:
    """π-vs-µ mismatch metrics on tokens sampled from µ, as a flat ``{name: float}`` dict.

    With log r_t = train_logp − rollout_logp over masked tokens (math in float64):

    * ``mismatch/kl_k1``, ``mismatch/kl_k2``, ``mismatch/kl_k3``: masked token means of −log r,
      ½(log r)², r − 1 − log r (k3 with log r clamped to ±20), i.e. KL(µ‖π).
    * ``mismatch/abs_logratio_mean`` / ``mismatch/abs_logratio_max``: mean / max of |log r|.
    * ``mismatch/seq_logratio_mean`` / ``mismatch/seq_logratio_std``: mean and population std
      (correction=0, so one sequence gives 0) over non-empty sequences of Σ_t m·log r_t.
    * ``mismatch/is_ratio_max``: max over masked tokens of π/µ = exp(max log r), the max taken in
      log space and clamped at ``IS_RATIO_MAX_LOG_CLAMP`` so the result is finite.
    * ``mismatch/is_ratio_std``: population std of the token IS ratio π/µ over masked tokens
      (log r clamped to ±20, the losses' clamp, so it stays finite).
    * ``mismatch/mis_masked_frac``: fraction of non-empty sequences whose sequence IS ratio
      ρ_i = exp(Σ_t log r_t) exceeds ``is_cap`` (what MIS would mask at that cap).
    * ``mismatch/n_tokens``: the number of masked tokens (the weight of this batch when pooling
      KL over a run: Σ kl·n / Σ n).
    * ``mismatch/kl_by_length/<lo>-<hi>``: k3 token mean over the sequences whose response length
      (mask sum) lies in [lo, hi] (see :func:`bucket_edges`); only non-empty buckets appear, with
      their token count ``mismatch/tokens_by_length/<lo>-<hi>``.
    * ``mismatch/router_topk_flip_rate``: only when both expert tensors are given
      (see :func:`router_topk_flip_rate`), with ``mismatch/router_topk_flip_rate/layer<i>`` per
      MoE layer (:func:`router_topk_flip_rate_by_layer`).

    With no masked token every value is 0.0 except ``is_ratio_max`` = 1.0.

    Args:
        train_logp: ``[N, T]`` tensor/array, log π of the sampled tokens.
        rollout_logp: ``[N, T]`` log µ of the same tokens.
        mask: ``[N, T]`` bool or 0/1.
        length_buckets (Sequence[int]): bucket upper edges; default (64, 256, 1024, 4096); pass
            tiny ones such as (4, 8, 16) for short CPU responses.
        train_experts: optional ``[N, T, layers, k]`` int expert ids chosen by the trainer.
        rollout_experts: optional same-shape ids chosen by the rollout engine.
        is_cap (float): the MIS threshold for ``mis_masked_frac`` (``algorithm.is_cap``, default 2).

    Returns:
        dict[str, float]: metric name → value.

    Raises:
        ValueError: mismatched shapes or bad ``length_buckets``.
    """
    buckets = bucket_edges(length_buckets)
    train, roll, m = _prepare(train_logp, rollout_logp, mask)
    log_r = train - roll
    n_tok = int(m.sum())
    lengths = m.sum(-1)
    seq = log_r.sum(-1)[lengths > 0]
    abs_r = log_r.abs()[m]
    out = {
        "kl_k1": float(kl_estimate(train, roll, m, "k1")),
        "kl_k2": float(kl_estimate(train, roll, m, "k2")),
        "kl_k3": float(kl_estimate(train, roll, m, "k3")),
        "abs_logratio_mean": float(abs_r.mean()) if n_tok else 0.0,
        "abs_logratio_max": float(abs_r.max()) if n_tok else 0.0,
        "seq_logratio_mean": float(seq.mean()) if seq.numel() else 0.0,
        "seq_logratio_std": float(seq.std(correction=0)) if seq.numel() else 0.0,
        "is_ratio_max": (
            math.exp(min(float(log_r[m].max()), IS_RATIO_MAX_LOG_CLAMP)) if n_tok else 1.0
        ),
        "is_ratio_std": float(log_r[m].clamp(-20.0, 20.0).exp().std(correction=0)) if n_tok else 0.0,
        "mis_masked_frac": float((seq > math.log(is_cap)).double().mean()) if seq.numel() else 0.0,
        "n_tokens": float(n_tok),
    }
    for lo, hi, name in buckets:
        rows = (lengths >= lo) & (lengths <= hi)
        if rows.any():
            out[f"kl_by_length/{name}"] = float(
                kl_estimate(train[rows], roll[rows], m[rows], "k3")
            )
            out[f"tokens_by_length/{name}"] = float(m[rows].sum())
    if (train_experts is None) != (rollout_experts is None):
        raise ValueError("pass both train_experts and rollout_experts, or neither")
    if train_experts is not None:
        out["router_topk_flip_rate"] = router_topk_flip_rate(train_experts, rollout_experts, m)
        for i, rate in enumerate(router_topk_flip_rate_by_layer(train_experts, rollout_experts, m)):
            out[f"router_topk_flip_rate/layer{i}"] = rate
    return {PREFIX + k: v for k, v in out.items()}


def router_topk_flip_rate(train_experts: Any, rollout_experts: Any, mask: Any) -> float:
    """Fraction of (masked token, layer) pairs whose top-k expert *set* differs between engines.

    Order within the top-k is ignored (both sides are sorted along k before comparing).
    Logged as ``mismatch/router_topk_flip_rate``.

    Args:
        train_experts: ``[B, T, layers, k]`` int expert ids chosen by the trainer's router.
        rollout_experts: same shape, ids chosen by the rollout engine's router.
        mask: ``[B, T]`` bool or 0/1.

    Returns:
        float: flips / (masked tokens × layers); 0.0 with no masked token.

    Raises:
        ValueError: shapes disagree or are not ``[B, T, layers, k]`` / ``[B, T]``.
    """
    a, b, m = (_as_tensor(x) for x in (train_experts, rollout_experts, mask))
    if a.dim() != 4 or a.shape != b.shape or tuple(a.shape[:2]) != tuple(m.shape):
        raise ValueError(
            "expert tensors must both be [B, T, layers, k] with mask [B, T], got "
            f"{tuple(a.shape)}, {tuple(b.shape)}, mask {tuple(m.shape)}"
        )
    m = m != 0
    differs = (a.sort(-1).values != b.sort(-1).values).any(-1)  # [B, T, layers]
    pairs = int(m.sum()) * a.shape[2]
    return float(differs[m].sum()) / pairs if pairs else 0.0


def router_topk_flip_rate_by_layer(train_experts: Any, rollout_experts: Any, mask: Any) -> list[float]:
    """:func:`router_topk_flip_rate` of each MoE layer.

    Flips / masked tokens, one float per layer (0.0 with no masked token). Same arguments and errors.

    Args:
        train_experts (Any): `[n, T, layers, k]` expert ids π's routers picked.
        rollout_experts (Any): `[n, T, layers, k]` expert ids µ's routers picked.
        mask (Any): `[n, T]` response mask (nonzero = valid token).

    Returns:
        list[float]: per MoE layer, the fraction of masked tokens whose top-k expert sets differ.
    """
    a, b, m = (_as_tensor(x) for x in (train_experts, rollout_experts, mask))
    router_topk_flip_rate(a, b, m)  # shape checks
    m = m != 0
    differs = (a.sort(-1).values != b.sort(-1).values).any(-1)[m]  # [masked tokens, layers]
    n = differs.shape[0]
    return [float(differs[:, i].sum()) / n if n else 0.0 for i in range(a.shape[2])]
