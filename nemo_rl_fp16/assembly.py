"""Run assembly: a typed recipe -> device, tokenizer, data, reward, starting weights and the engines.

The one place a run is put together, for every command: `build_run` (the `rl` command, in
process or with the engines as Ray actors) and `offline_setup` (`mismatch`, `doctor`); `preflight`
uses its tokenizer and starting weights. Both engines are built from the same `PrecisionPolicy`
pair (`precision.resolve_policies`) and start from the same fp32 weights (a seeded init, an
optional cached SFT warm start, or a local HF checkpoint). The engines themselves come from their
packages' factories (`policy.build_policy`, `rollout.build_rollout_engine`); the device from the
plan's one rule (`plan.run_device`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nemo_rl_fp16.config import ConfigError, RecipeConfig
from nemo_rl_fp16.data import Problem, get_dataset, get_reward
from nemo_rl_fp16.interfaces import PolicyEngine, RolloutEngine, SamplingParams
from nemo_rl_fp16.modeling.tokenizer import build_tokenizer
from nemo_rl_fp16.plan import device_problems, run_device, unimplemented_problems
from nemo_rl_fp16.policy import build_policy
from nemo_rl_fp16.policy.reference import ReferencePolicy, build_reference
from nemo_rl_fp16.precision import PrecisionPolicy, resolve_policies
from nemo_rl_fp16.rollout import build_rollout_engine

__all__ = ["OfflineSetup", "RunSetup", "build_run", "build_tokenizer", "check_policy_backend", "initial_weights",
           "offline_setup", "resolve_device"]


@dataclass
class RunSetup:
    """An assembled run: what the loop (`trainer.RLTrainer`) and the `rl` command use.

    Attributes:
        tokenizer: the run's tokenizer (`build_tokenizer`).
        problems (list[Problem]): the training problems (`data.get_dataset`).
        prompt_ids (list[list[int]]): token ids of each problem's prompt.
        reward (Callable[[str, str], float]): `reward.name`'s function (response text, answer).
        model_cfg (dict): the recipe's `model:` block.
        train_policy (PrecisionPolicy): the trainer side's dtypes and loss scaling.
        rollout_policy (PrecisionPolicy): the rollout engine's dtypes.
        policy (PolicyEngine): π.
        rollout (RolloutEngine): µ.
        reference (ReferencePolicy | PolicyEngine | None): frozen π_ref (`algorithm.kl_coef > 0`; forward-only,
            `policy.reference`; a `RayPolicyGroup` over the ranks' references under Ray), else None.
        device (str): `cpu` or `cuda`.
        close (Callable[[], None] | None): releases remote workers (Ray); None for in-process engines.
    """

    tokenizer: object
    problems: list[Problem]
    prompt_ids: list[list[int]]
    reward: Callable[[str, str], float]
    model_cfg: dict
    train_policy: PrecisionPolicy
    rollout_policy: PrecisionPolicy
    policy: PolicyEngine
    rollout: RolloutEngine
    reference: ReferencePolicy | PolicyEngine | None
    device: str
    close: Callable[[], None] | None = None


def resolve_device(device: str | RecipeConfig) -> str:
    """The run's device by `plan.run_device` (the one rule); a bare `device` string = a single-process run.

    Args:
        device (str | RecipeConfig): a typed recipe, or `cpu` | `cuda` | `auto`.

    Returns:
        str: `cpu` or `cuda`.

    Raises:
        ConfigError: the result is cuda in this process and torch sees no CUDA device.
    """
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


def initial_weights(rc: RecipeConfig, tokenizer: Any, problems: list[Problem], console: Console) -> dict | None:
    """fp32 starting weights shared by both engines (None = the checkpoint at model.name_or_path).

    A model built from `model.config` is initialised under `torch.manual_seed(seed)` (the init is
    part of the run's identity and of the warm-start cache key); with `warm_start.enabled` it is
    then SFT-trained on `problems` (`warm_start.warm_start`, cached in `warm_start.cache_dir`).

    Args:
        rc (RecipeConfig): the typed recipe.
        tokenizer: the run's tokenizer (the warm start encodes the problems with it).
        problems (list[Problem]): the training problems.
        console (Console): where the warm start announces itself.

    Returns:
        dict | None: fp32 state dict (HF names), or None when both engines load `model.name_or_path`.
    """
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


def check_policy_backend(rc: RecipeConfig) -> None:
    """`policy.backend` is one this install can build: megatron-core importable, CUDA, implemented features.

    Args:
        rc (RecipeConfig): the typed recipe.

    Raises:
        ConfigError: one line per problem (megatron-core missing, a device or feature the
            Megatron backend does not run, an unknown backend).
    """
    if rc.policy.backend == "torch":
        return
    if rc.policy.backend != "megatron":
        raise ConfigError(f"policy.backend={rc.policy.backend} is not available; use policy.backend=torch|megatron")
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        raise ConfigError("policy.backend=megatron needs megatron-core (pip install 'nemo_rl_fp16[megatron]'; "
                          "Python 3.11 resolves 0.16.1, 3.12 the newest)") from e
    problems = device_problems(rc, run_device(rc)) + unimplemented_problems(rc)  # the plan's own checks
    if problems:
        raise ConfigError("\n".join(problems))


def build_run(rc: RecipeConfig, console: Console | None = None) -> RunSetup:
    """Assemble a run: data, tokenizer, starting weights, π (and π_ref) and µ, in process or on Ray.

    Args:
        rc (RecipeConfig): the typed recipe (validated: `plan.check_run`).
        console (Console | None): where the warm start and Ray report.

    Returns:
        RunSetup: the assembled run; call its `close` (when set) to release Ray workers.

    Raises:
        ConfigError: the backend cannot be built here (`check_policy_backend`), a missing device,
            tokenizer folder or optional package.
    """
    console = console or Console()
    check_policy_backend(rc)
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

        ray_engines = RayEngines(rc, model_cfg, train_pol, rollout_pol, tokenizer, init, model_dir, device, console)
        return RunSetup(tokenizer, problems, prompt_ids, get_reward(rc.reward.name), model_cfg, train_pol,
                        rollout_pol, ray_engines.policy, ray_engines.rollout, ray_engines.reference,
                        ray_engines.device, close=ray_engines.close)
    policy = build_policy(rc, model_cfg, train_pol, device, init)
    # π_ref: forward-only (weights in param_dtype; no fp32 master, optimizer or gradients)
    reference = build_reference(rc, model_cfg, train_pol, device, init) if rc.algorithm.kl_coef > 0 else None
    rollout = build_rollout_engine(rc, rollout_pol, model_cfg, tokenizer, device,
                                   initial_state_dict=policy.rollout_state_dict(), model_dir=model_dir)
    return RunSetup(tokenizer, problems, prompt_ids, get_reward(rc.reward.name), model_cfg, train_pol,
                    rollout_pol, policy, rollout, reference, device)


@dataclass
class OfflineSetup:
    """What the offline commands (`mismatch`, `doctor`) share.

    Attributes:
        device (str): `cpu` or `cuda`.
        tokenizer: the run's tokenizer.
        problems (list): the dataset's problems.
        prompts (list[list[int]]): `mismatch.num_prompts` prompts' token ids (problems cycled).
        init (dict | None): the run's starting weights (`initial_weights`).
        model_cfg (dict): the recipe's `model:` block.
        params (SamplingParams): the recipe's sampling settings and seed.
    """

    device: str
    tokenizer: Any
    problems: list
    prompts: list[list[int]]
    init: dict | None
    model_cfg: dict
    params: SamplingParams


def offline_setup(rc: RecipeConfig, console: Console) -> OfflineSetup:
    """Build the `OfflineSetup` of a typed recipe (runs the warm start when the recipe has one).

    Args:
        rc (RecipeConfig): the typed recipe.
        console (Console): where the warm start announces itself.

    Returns:
        OfflineSetup: device, tokenizer, prompts, starting weights and sampling parameters.

    Raises:
        ConfigError: a missing device or tokenizer folder.
    """
    device = resolve_device(rc)
    tokenizer = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    prompts = [tokenizer(problems[i % len(problems)].prompt)["input_ids"] for i in range(rc.mismatch.num_prompts)]
    params = SamplingParams(max_new_tokens=rc.rollout.max_new_tokens, temperature=rc.rollout.temperature,
                            top_p=rc.rollout.top_p, num_generations=rc.rollout.num_generations, seed=rc.seed,
                            stop_token_ids=(tokenizer.eos_token_id,))
    return OfflineSetup(device, tokenizer, problems, prompts, initial_weights(rc, tokenizer, problems, console),
                        rc.model.model_dump(), params)
