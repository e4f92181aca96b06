"""Policy trainers (π): `TorchPolicy` (HF/torch, fp32 master + low-precision compute); `build_policy`."""

from nemo_rl_fp16.policy.factory import build_policy
from nemo_rl_fp16.policy.torch_policy import TorchPolicy

__all__ = ["TorchPolicy", "build_policy"]
