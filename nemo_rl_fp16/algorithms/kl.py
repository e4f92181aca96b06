"""Sample-based KL estimators k1 / k2 / k3 (J. Schulman, "Approximating KL Divergence", 2020).

Used for the KL penalty to a reference policy and for the training-inference mismatch metrics
of arXiv 2510.26788 (https://arxiv.org/abs/2510.26788), where KL(µ‖π) is estimated on tokens
sampled from the rollout engine µ.

With samples x ~ q and log r = log p(x) − log q(x):

* k1 = −log r                 (unbiased, can be negative per sample)
* k2 = ½ (log r)²             (biased, low variance, ≥ 0)
* k3 = r − 1 − log r          (unbiased, ≥ 0, low variance)

each estimating KL(q‖p).
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")
#: log r is clamped to ±20 before k3's exp: e^20 ≈ 4.9e8 is already an absurd ratio, and fp32
#: exp overflows past ~88. Same bound as verl's ``low_var_kl``.
K3_LOG_RATIO_CLAMP = 20.0


def _per_token(log_r: Tensor, kind: str) -> Tensor:
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    if kind == "k3":
        c = log_r.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.exp(c) - 1.0 - c
    raise ValueError(f"unknown KL estimator kind {kind!r}; allowed values: {', '.join(KL_KINDS)}")


def _log_ratio(logp_p: Tensor, logp_q: Tensor, m: Tensor) -> Tensor:
    if logp_p.shape != logp_q.shape or logp_p.shape != m.shape:
        raise ValueError(
            f"shape mismatch: logp_p {tuple(logp_p.shape)}, logp_q {tuple(logp_q.shape)}, "
            f"mask {tuple(m.shape)}"
        )
    cdt = torch.float64 if torch.float64 in (logp_p.dtype, logp_q.dtype) else torch.float32
    zero = torch.zeros((), dtype=cdt, device=logp_p.device)
    # where() rather than multiply: padding may hold inf/NaN and must not leak into sums/grads.
    return torch.where(m, logp_p.to(cdt) - logp_q.to(cdt), zero)


def kl_estimate(logp_p: Tensor, logp_q: Tensor, mask: Tensor, kind: str = "k3") -> Tensor:
    """Masked token-mean estimate of KL(q‖p) from tokens sampled from q.

    log r = logp_p − logp_q; k1 = −log r, k2 = ½(log r)², k3 = r − 1 − log r with log r clamped
    to [−20, 20] (``K3_LOG_RATIO_CLAMP``) before the exp, so k3 stays finite and ≥ 0. The exp
    runs in fp32 (fp64 if an input is fp64).

    Args:
        logp_p (Tensor): ``[...]`` log p of the sampled tokens (e.g. trainer π).
        logp_q (Tensor): same shape, log q of the same tokens (the sampler, e.g. rollout µ).
        mask (Tensor): same shape, bool or 0/1; nonzero = token counts.
        kind (str): ``k1`` | ``k2`` | ``k3``.

    Returns:
        Tensor: 0-dim estimate (Σ m·k / Σ m; 0 when the mask is empty). Not detached.

    Raises:
        ValueError: unknown ``kind`` or mismatched shapes.
    """
    m = mask != 0
    k = _per_token(_log_ratio(logp_p, logp_q, m), kind)
    return torch.where(m, k, 0.0).sum() / m.sum().clamp(min=1).to(k.dtype)


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π‖ref) on tokens sampled from π, to add to a loss.

    log r = ref_logp − logp (p = ref, q = π), then k1/k2/k3 as in :func:`kl_estimate`.
    Gradients flow through ``logp`` (and ``ref_logp`` if it requires grad; detach it normally).

    Args:
        logp (Tensor): ``[B, T]`` log π_θ of the sampled tokens.
        ref_logp (Tensor): ``[B, T]`` log π_ref of the same tokens.
        mask (Tensor): ``[B, T]`` bool or 0/1.
        kind (str): ``k1`` | ``k2`` | ``k3``.

    Returns:
        Tensor: ``[B, T]`` penalty in fp32 (fp64 if an input is fp64), 0 where masked.

    Raises:
        ValueError: unknown ``kind`` or mismatched shapes.
    """
    m = mask != 0
    return torch.where(m, _per_token(_log_ratio(ref_logp, logp, m), kind), 0.0)
