"""RL algorithms as pure tensor functions: losses, advantages, KL estimators.

See arXiv 2510.26788 (https://arxiv.org/abs/2510.26788) for the FP16 setting they serve.
"""

from nemo_rl_fp16.algorithms.advantages import group_advantages
from nemo_rl_fp16.algorithms.kl import KL_KINDS, kl_estimate, kl_penalty
from nemo_rl_fp16.algorithms.loss_fn import BoundLoss, LossInputs, PolicyLossFn
from nemo_rl_fp16.algorithms.losses import (
    ALGORITHMS,
    CORRECTIONS,
    REDUCTIONS,
    VALID_PAIRINGS,
    combine_metrics,
    policy_loss,
)

__all__ = [
    "ALGORITHMS",
    "BoundLoss",
    "CORRECTIONS",
    "KL_KINDS",
    "LossInputs",
    "REDUCTIONS",
    "VALID_PAIRINGS",
    "PolicyLossFn",
    "combine_metrics",
    "group_advantages",
    "kl_estimate",
    "kl_penalty",
    "policy_loss",
]
