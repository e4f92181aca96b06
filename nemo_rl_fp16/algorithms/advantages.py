"""Group-relative advantages (GRPO, https://arxiv.org/abs/2402.03300).

Used by every loss in :mod:`nemo_rl_fp16.algorithms.losses`; see also arXiv 2510.26788
(https://arxiv.org/abs/2510.26788), whose runs use this estimator unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Per-group normalised advantages.

    ``rewards`` is split into consecutive groups of ``group_size`` (the generations of one
    prompt). Within a group with mean R̄ and unbiased std σ (``torch.std``, correction=1):

    * ``normalize_std=True``: A = (R − R̄) / (σ + eps)
    * ``normalize_std=False``: A = R − R̄

    Edge cases: a group whose rewards are all equal (this includes ``group_size == 1``, where
    the unbiased std is undefined) gets exactly 0 advantages, never NaN and never the rounding
    residue of R − R̄. Math runs in fp32 (fp64 stays fp64); integer/bool rewards are accepted.

    Args:
        rewards (Tensor): ``[N]`` rewards, N divisible by ``group_size``.
        group_size (int): generations per prompt (≥ 1).
        normalize_std (bool): divide by the group std.
        eps (float): added to the std.

    Returns:
        Tensor: ``[N]`` advantages in fp32 (fp64 if ``rewards`` is fp64), detached.

    Raises:
        ValueError: ``rewards`` not 1-D, ``group_size`` < 1, or N not divisible by it.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not divisible by group_size ({group_size})"
        )
    cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    groups = rewards.detach().to(cdt).reshape(-1, group_size)
    centered = groups - groups.mean(-1, keepdim=True)
    constant = groups.amax(-1, keepdim=True) == groups.amin(-1, keepdim=True)
    centered = torch.where(constant, 0.0, centered)
    if normalize_std and group_size > 1:
        centered = centered / (groups.std(-1, keepdim=True) + eps)
    return centered.reshape(-1)
