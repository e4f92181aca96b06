"""Policy trainers (π): `TorchPolicy` (HF/torch, fp32 master + low-precision compute)."""

from nemo_rl_fp16.policy.torch_policy import TorchPolicy

__all__ = ["TorchPolicy"]
