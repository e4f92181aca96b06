"""The run plan a dry run prints: engines, dtypes per side, parallel layout; and layout checks.

Everything here is derived from the config alone (no model is built), so a bad layout fails in
a second on a login node instead of after minutes of model loading on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_rl_fp16.config import ConfigError, RecipeConfig
from nemo_rl_fp16.precision import resolve_policies


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int

    def __str__(self) -> str:
        return f"world {self.world_size} = TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp} (EP {self.ep})"


def parallel_layout(cfg: RecipeConfig) -> Layout:
    """Derive DP from world size and TP/PP/CP; refuse layouts that do not divide."""
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
    if (dp * p.context_parallel_size) % p.expert_parallel_size:
        problems.append(
            f"policy.expert_parallel_size={p.expert_parallel_size} must divide DP x CP = "
            f"{dp * p.context_parallel_size}"
        )
    if p.backend == "megatron":
        problems += megatron_layout_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    return Layout(world, p.tensor_parallel_size, p.pipeline_parallel_size, p.context_parallel_size,
                  p.expert_parallel_size, dp)


def megatron_layout_problems(cfg: RecipeConfig) -> list[str]:
    """Model-shape checks for megatron parallelism (one line each; empty when the layout is unknown)."""
    from nemo_rl_fp16.policy.memory import model_layout

    try:
        lay, _ = model_layout(cfg.model)
    except (ValueError, KeyError) as e:
        return [f"model layout: {e}"]
    if lay is None:
        return []
    p = cfg.policy
    return lay.parallel_problems(p.tensor_parallel_size, p.pipeline_parallel_size, p.expert_parallel_size)


def _megatron_plan_lines(cfg: RecipeConfig, layout: Layout, param_dtype) -> dict[str, str]:
    """Parameter count and per-GPU memory estimate lines (megatron backend)."""
    from nemo_rl_fp16.policy.memory import estimate_memory, fmt_gib, fmt_params, model_layout

    lay, source = model_layout(cfg.model)
    if lay is None:
        return {"parameters": f"unknown ({source}); memory estimate skipped"}
    n = lay.num_parameters()
    params = f"{fmt_params(n['total'])} total"
    if lay.is_moe:
        params += f", {fmt_params(n['active'])} active/token ({lay.num_experts} experts, top-{lay.moe_top_k})"
    seq = min(cfg.rollout.max_new_tokens + 1024, lay.max_position_embeddings)
    import torch

    m = estimate_memory(lay, tp=layout.tp, pp=layout.pp, ep=layout.ep, dp=layout.dp,
                        param_bytes=torch.tensor([], dtype=param_dtype).element_size(),
                        micro_batch=cfg.policy.micro_batch_size, seq=seq,
                        sequence_parallel=cfg.policy.sequence_parallel, recompute=cfg.policy.activation_checkpointing)
    return {
        "parameters": f"{params}; {fmt_params(m.params_local)} per GPU (layout from {source})",
        "memory/GPU": (f"weights {fmt_gib(m.weights)} + grads {fmt_gib(m.grads)} (fp32) + optimizer "
                       f"{fmt_gib(m.optimizer)} (fp32 master+Adam; {fmt_gib(m.optimizer_distributed)} distributed) + "
                       f"activations {fmt_gib(m.activations)} (micro-batch {cfg.policy.micro_batch_size} x seq {seq}"
                       f"{', recompute' if cfg.policy.activation_checkpointing else ''}) = {fmt_gib(m.total)} "
                       f"({fmt_gib(m.total_distributed)} with the distributed optimizer)"),
    }


def make_plan(cfg: RecipeConfig) -> dict[str, object]:
    """What the run will do, as an ordered dict of printable facts."""
    train_pol, rollout_pol = resolve_policies(cfg.precision.model_dump())
    layout = parallel_layout(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if cfg.cluster.gpus_per_node else "cpu (auto)")
    model = cfg.model.name_or_path or f"built from config ({cfg.model.config.get('model_type', '?')})"
    samples = cfg.data.prompts_per_step * cfg.rollout.num_generations
    plan = {
        "recipe": cfg.recipe,
        "output_dir": cfg.output_dir,
        "model": model,
        "device": device,
        "trainer": f"{cfg.policy.backend}  dtypes: {_dtypes(train_pol.describe())}",
        "rollout": f"{cfg.rollout.backend}  dtypes: {_dtypes(rollout_pol.describe())}",
        "precision contract": (
            "trainer and rollout agree" if not train_pol.differences(rollout_pol)
            else "DELIBERATE MISMATCH: " + "; ".join(train_pol.differences(rollout_pol))
        ),
        "loss scaling": train_pol.describe()["loss_scale"],
        "layout": str(layout),
        "placement": _placement_line(cfg),
        "algorithm": (
            f"{cfg.algorithm.name} + correction {cfg.algorithm.correction}, reduction "
            f"{cfg.algorithm.reduction}, clip [{1 - cfg.algorithm.clip_low:g}, {1 + cfg.algorithm.clip_high:g}]"
        ),
        "data": f"{cfg.data.dataset} ({cfg.data.path or f'{cfg.data.num_problems} problems'}), reward {cfg.reward.name}",
        "batch": (
            f"{cfg.data.prompts_per_step} prompts x {cfg.rollout.num_generations} generations = {samples} "
            f"samples/step, <= {cfg.rollout.max_new_tokens} new tokens, {cfg.algorithm.updates_per_rollout} "
            f"update(s)/rollout"
        ),
        "steps": f"{cfg.trainer.max_steps} (save every {cfg.trainer.save_every or 'end'}, resume {cfg.trainer.resume})",
        "warm start": (f"{cfg.warm_start.steps} SFT steps, cached in {cfg.warm_start.cache_dir}"
                       if cfg.warm_start.enabled else "off"),
    }
    if cfg.policy.backend == "megatron":
        plan.update(_megatron_plan_lines(cfg, layout, train_pol.param_dtype))
    return plan


def _placement_line(cfg: RecipeConfig) -> str:
    r = cfg.cluster.ray
    if not r.enabled:
        return "one process (cluster.ray.enabled=false)"
    from nemo_rl_fp16.distributed.placement import plan_placement

    pl = plan_placement(r.layout, r.trainer_workers, r.rollout_workers, gpus=cfg.cluster.gpus_per_node > 0,
                        cpus_per_worker=r.cpus_per_worker, rollout_tp=cfg.rollout.tensor_parallel_size)
    total = ", ".join(f"{k} {v:g}" for k, v in pl.total.items())
    return (f"Ray {r.layout}: {r.trainer_workers} trainer ranks + {r.rollout_workers} rollout engines in "
            f"{len(pl.bundles)} bundles ({total}); Ray at {r.address or 'RAY_ADDRESS or a local instance'}")


def _dtypes(d: dict[str, str]) -> str:
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    keys = ("param_dtype", "compute_dtype", "master_dtype", "logits_dtype", "router_dtype", "kv_cache_dtype")
    return ", ".join(f"{k.removesuffix('_dtype')}={short[d[k]]}" for k in keys)


def format_plan(plan: dict[str, object]) -> str:
    width = max(len(k) for k in plan)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in plan.items())
