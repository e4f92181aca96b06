"""The dry-run plan's printable facts: what the run will do, and its memory per GPU and per host.

`plan_facts` turns a typed recipe and its validated layout (`plan.parallel_layout`) into ordered
`label -> fact` lines (recipe, model, device, both engines' dtypes, the precision contract, loss
scaling, layout, placement, router replay, algorithm, data, batch, steps, warm start, eval; on
CUDA or with the megatron backend, parameter counts and the memory budget of `memory_budget`);
`format_plan` prints them. The checks themselves live in `plan.py` (the validation stage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nemo_rl_fp16.config import RecipeConfig
from nemo_rl_fp16.precision import PRESET_OF, resolve_policies

if TYPE_CHECKING:
    from nemo_rl_fp16.plan import Layout


def plan_facts(cfg: RecipeConfig, layout: Layout, run_device: str) -> dict[str, object]:
    """What the run will do, as an ordered dict of printable facts.

    Args:
        cfg (RecipeConfig): the typed recipe.
        layout (Layout): its trainer layout (`plan.parallel_layout`, already checked).
        run_device (str): the run's device (`plan.run_device`).

    Returns:
        dict[str, object]: label -> printable fact (recipe, model, device, both engines' dtypes,
            the precision contract, loss scaling, layout, placement, refit, micro-batches, router
            replay, algorithm, data, batch, steps, warm start, eval; parameters and memory lines
            (`memory_lines`) on CUDA; megatron on CPU: the rehearsal-mode note).
    """
    train_pol, rollout_pol = resolve_policies(cfg.precision.model_dump())
    device = run_device + (" (auto)" if cfg.device == "auto" else "")
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
        "refit": _refit_line(cfg, run_device),
        "micro-batches": _micro_batch_line(cfg),
        "router replay": _replay_line(cfg),
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
        "eval": (f"every {cfg.trainer.eval_every} steps and at the end: greedy accuracy, pass@{cfg.trainer.eval_k}, "
                 f"mean@{cfg.trainer.eval_k} on " + (cfg.data.eval_path or f"{cfg.data.eval_num_problems} held-out "
                                                     f"{cfg.data.dataset} problems")
                 if cfg.trainer.eval_every else "off"),
    }
    if run_device == "cuda":  # per-GPU figures; a CPU run (megatron: the rehearsal mode) has no GPU to plan
        plan.update(_memory_plan_lines(cfg, layout, run_device))
    elif cfg.cluster.gpu_memory_gb:  # a GPU recipe tried off CUDA: its GPU size is not checked, and said so
        plan["memory/peak"] = (f"not checked (cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g} describes the "
                               f"GPUs; this run has none)")
    if cfg.policy.backend == "megatron" and run_device == "cpu":
        plan["megatron on CPU"] = CPU_MEGATRON_NOTE
    return plan


#: the plan's note for `policy.backend=megatron` on CPU (allowed, for rehearsals and tests)
CPU_MEGATRON_NOTE = ("REHEARSAL mode: megatron-core over gloo with its CUDA calls redirected to the CPU "
                     "(policy/megatron/cpu_rehearsal.py); slow, for layout rehearsals and tests, not for training")


def _refit_line(cfg: RecipeConfig, device: str) -> str:
    r = cfg.rollout
    bucket = f"buckets of <= {r.refit_bucket_mb:g} MiB in the rollout dtype"
    if not cfg.cluster.ray.enabled:
        return f"in process ({'vLLM: ' + bucket if r.backend == 'vllm' else 'the torch engine copies the weights'})"
    from nemo_rl_fp16.distributed.ray_refit import choose_transport

    try:
        transport = choose_transport(r.refit_transport, device, cfg.cluster.ray.layout)
    except ValueError:  # refused by the validation stage with its own line
        transport = r.refit_transport
    how = {"object_store": "trainer rank 0 -> Ray's object store -> every engine",
           "broadcast": "trainer rank 0 broadcasts to every engine (a gloo/NCCL group of its own)",
           "ipc": "every trainer rank hands the engine on its bundle a handle (CUDA IPC / shared memory)"}[transport]
    return f"{transport} (rollout.refit_transport={r.refit_transport}): {how}; {bucket}"


def _micro_batch_line(cfg: RecipeConfig) -> str:
    p = cfg.policy
    if p.sequence_packing:
        how = "packed: rows sorted by length, neighbours together, real tokens left-aligned (policy.sequence_packing)"
    elif p.backend == "megatron" and p.pipeline_parallel_size == 1:
        how = "trimmed to their own length (policy/trim.py; policy.sequence_packing=true packs them)"
    else:
        how = "at the batch's padded width (policy.sequence_packing=true packs them)"
    return f"{p.micro_batch_size} rows each, {how}"


def _replay_line(cfg: RecipeConfig) -> str:
    if cfg.policy.router_replay == "rollout":
        return "rollout (R3): the trainer routes response tokens to the rollout engine's recorded experts"
    if cfg.policy.router_replay == "trainer":
        return "trainer (R2): the update passes route response tokens as the trainer's old-logprob pass did"
    return "none (MoE: each engine routes with its own gate; the flip rate is logged with the torch rollout engine)"


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
    keys = ("param_dtype", "compute_dtype", "master_dtype", "logits_dtype", "router_dtype", "kv_cache_dtype")
    return ", ".join(f"{k.removesuffix('_dtype')}={PRESET_OF[d[k]]}" for k in keys)


def format_plan(plan: dict[str, object]) -> str:
    """The plan (`make_plan`) as aligned `key  value` lines for the dry run.

    Args:
        plan (dict[str, object]): as `make_plan` returns.

    Returns:
        str: one indented `key  value` line per entry, keys padded to one width.
    """
    width = max(len(k) for k in plan)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in plan.items())


def _memory_plan_lines(cfg: RecipeConfig, layout: Layout, device: str) -> dict[str, str]:
    """Parameter count and the memory budget lines (`memory_budget`)."""
    from nemo_rl_fp16.memory_budget import memory_lines, plan_memory
    from nemo_rl_fp16.policy.memory import fmt_params, model_layout

    lay, source = model_layout(cfg.model)
    if lay is None:
        return {"parameters": f"unknown ({source}); memory estimate skipped"}
    n = lay.num_parameters()
    params = f"{fmt_params(n['total'])} total"
    if lay.is_moe:
        params += f", {fmt_params(n['active'])} active/token ({lay.num_experts} experts, top-{lay.moe_top_k})"
    budget = plan_memory(cfg, layout, device)
    local = "" if isinstance(budget, str) else f"; {fmt_params(_params_local(cfg, lay, layout))} per GPU"
    return {"parameters": f"{params}{local} (layout from {source})", **memory_lines(budget, cfg)}


def _params_local(cfg: RecipeConfig, lay, layout: Layout) -> float:
    """Parameters one trainer GPU holds: megatron's TP/PP/EP share, FSDP2's DP shard."""
    n = lay.num_parameters()
    if cfg.policy.backend == "megatron":
        return (n["total"] - n["experts"]) / (layout.tp * layout.pp) + n["experts"] / (layout.ep * layout.pp)
    return n["total"] / layout.dp
