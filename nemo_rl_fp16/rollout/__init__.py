"""Rollout engines (µ): `TorchRolloutEngine` (KV-cached HF sampler, the CPU default)."""

from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine

__all__ = ["TorchRolloutEngine"]
