"""Policy trainers (π): `TorchPolicyTrainer` (HF/torch, fp32 master + low-precision compute)."""

from nemo_rl_fp16.policy.torch_policy import TorchPolicyTrainer

__all__ = ["TorchPolicyTrainer"]
