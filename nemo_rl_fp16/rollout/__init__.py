"""Rollout engines (µ): `TorchRolloutEngine` (KV-cached HF sampler, the CPU default); `build_rollout_engine`."""

from nemo_rl_fp16.rollout.factory import build_rollout_engine
from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine

__all__ = ["TorchRolloutEngine", "build_rollout_engine"]
