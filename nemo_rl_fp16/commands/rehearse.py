"""The `rehearse` command: a recipe's parallel layout, shrunk, run 2 RL steps on a simulated multi-node CPU Ray cluster.

    nemo-rl-fp16 rehearse recipe=dense_14b_fp16
    nemo-rl-fp16 rehearse recipe=moe_30b_a3b_fp16 rehearse.nodes=2 rehearse.trainer_ranks=4

A GPU layout (megatron TP x DP, EP, Ray split or colocated layout, several rollout engines in
their own actors) meets most of its failure modes before the first step: groups that do not
divide, collectives that hang, ranks on the wrong node, refit between actors. The rehearsal runs
the same layout KINDS at a size that fits a laptop, through the normal run path (`commands.rl.run`
-> `assembly.build_run` -> `distributed.RayEngines`): `miniature` derives the overrides from the
recipe, `simulated_cluster` starts a local Ray cluster (`ray.cluster_utils.Cluster`) shaped like
the recipe's split layout (`node_sizes`: trainer nodes of whole TP/EP blocks, a node for the
engines; `rehearse.nodes` overrides the count), and the run prints where each rank landed and each
step's metrics.

What is kept: `policy.backend` (megatron runs on CPU over gloo: `policy.megatron.cpu_rehearsal`),
TP, EP and DP (shrunk to `rehearse.trainer_ranks` ranks: TP min(TP, 2), DP the rest, EP min(EP,
DP) dividing DP), activation recompute, the Ray layout, several rollout engines, the precision
recipe, the algorithm. What is replaced, and said so: the model (a tiny config-built model of the
same family, dense or MoE), the data (the generated sanity task), the rollout backend (the torch
engine stands in for vLLM; one CPU each, so TP 1), the devices (CPU, gloo instead of NCCL),
sequence parallelism (off: it needs Transformer Engine, which has no CPU build; its width padding is
unit-tested in tests/unit/policy/megatron), the distributed optimizer (CUDA only).
Afterwards the TP ranks' replicated weights (norms, routers) are compared bitwise.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from nemo_rl_fp16.config import ConfigError, RecipeConfig, load_recipe, typed

__all__ = ["block_size", "main", "miniature", "node_sizes", "rehearse", "replaced_overrides", "simulated_cluster",
           "tp_replica_check"]

#: rehearsal options (`rehearse.<key>=<value>` on the command line) and their defaults (trainer_ranks None:
#: 4, or 8 where the recipe's EP groups span data-parallel ranks; nodes None: as the recipe, `miniature`)
OPTIONS: dict[str, int | None] = {"nodes": None, "trainer_ranks": None, "rollout_engines": 2, "steps": 2}

#: the metrics printed for each step
STEP_KEYS = ("reward/mean", "loss/value", "train/grad_norm", "train/loss_scale", "mismatch/kl_k3", "refit/bytes")

#: tiny models built from a config, one per family (the shapes tests use: recipes sanity_tiny / moe_tiny)
TINY_DENSE = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": False}
TINY_MOE = {"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 64, "tie_word_embeddings": False}


def split_options(overrides: list[str]) -> tuple[dict[str, int | None], list[str]]:
    """`rehearse.<key>=<int>` options apart from the recipe overrides.

    Args:
        overrides (list[str]): the command line's dotlist.

    Returns:
        tuple[dict[str, int | None], list[str]]: the options (defaults filled in) and the other overrides.

    Raises:
        ConfigError: an unknown `rehearse.` key or a value that is not an integer >= 1.
    """
    opts, rest = dict(OPTIONS), []
    for item in overrides:
        if not item.startswith("rehearse."):
            rest.append(item)
            continue
        key, _, value = item[len("rehearse."):].partition("=")
        if key not in OPTIONS:
            raise ConfigError(f"unknown key 'rehearse.{key}'; allowed: {', '.join('rehearse.' + k for k in OPTIONS)}")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"bad value for 'rehearse.{key}': {value!r}; allowed: an integer >= 1")
        opts[key] = int(value)
    return opts, rest


#: the miniature's keys derived from the recipe (a user override of these shapes what is shrunk); every other key
#: the miniature sets replaces the user's value, so overriding it is refused (`replaced_overrides`)
DERIVED = frozenset({"policy.tensor_parallel_size", "policy.expert_parallel_size", "policy.sequence_packing",
                     "cluster.ray.layout", "cluster.nodes", "cluster.ray.trainer_workers",
                     "cluster.ray.rollout_workers", "data.prompts_per_step"})
#: where an option of the command sets what a replaced key would have
OPTION_FOR = {"trainer.max_steps": "rehearse.steps", "cluster.ray.trainer_workers": "rehearse.trainer_ranks",
              "cluster.ray.rollout_workers": "rehearse.rollout_engines", "cluster.nodes": "rehearse.nodes"}


def replaced_overrides(user: list[str], over: list[str]) -> None:
    """Refuse the user's overrides of keys the miniature sets to its own values (they would be dropped silently).

    Args:
        user (list[str]): the command line's recipe overrides (`key=value`).
        over (list[str]): the miniature's overrides (`miniature`).

    Raises:
        ConfigError: one line per replaced key, naming the option that sets it where there is one.
    """
    fixed = {o.split("=", 1)[0] for o in over} - DERIVED
    lines = []
    for item in user:
        key = item.split("=", 1)[0].lstrip("+")
        if key in fixed:
            hint = f"use {OPTION_FOR[key]}=N" if key in OPTION_FOR else "the rehearsal sets it for the miniature"
            lines.append(f"bad key for 'rehearse': {key}; allowed: keys the miniature does not set ({hint}); "
                         f"remove {key}=")
    if lines:
        raise ConfigError("\n".join(lines))


def miniature(rc: RecipeConfig, *, trainer_ranks: int | None = None, rollout_engines: int = 2, steps: int = 2,
              nodes: int | None = None) -> tuple[list[str], list[str]]:
    """The overrides that shrink a recipe to a CPU rehearsal of its parallel layout, and what they change.

    Args:
        rc (RecipeConfig): the real recipe (typed).
        trainer_ranks (int | None): trainer ranks of the miniature (TP x DP); None: TP x 2, or, where the
            recipe's EP is larger than its TP (megatron's EP groups then span data-parallel ranks, each
            with its own rows, as EP 8 over TP 2 does), TP x 2TP with EP 2TP, which keeps that.
        rollout_engines (int): the most rollout engines (the recipe's count if fewer).
        steps (int): RL steps.
        nodes (int | None): nodes of the simulated cluster; None: as the recipe's split layout, its
            trainer nodes (at most one per TP/EP block of the miniature) plus one node for the engines.

    Returns:
        tuple[list[str], list[str]]: dotlist overrides (applied after the recipe's own), and one
            printable line per layout fact kept or replaced.

    Raises:
        ConfigError: `trainer_ranks` cannot hold the shrunk TP (TP must divide it).
    """
    from nemo_rl_fp16.policy.memory import model_layout

    p = rc.policy
    try:
        lay, _ = model_layout(rc.model)
    except (ValueError, KeyError):
        lay = None
    moe = bool(lay.is_moe) if lay is not None else p.expert_parallel_size > 1
    tp = min(p.tensor_parallel_size, 2)
    ep_spans_dp = moe and p.expert_parallel_size > p.tensor_parallel_size
    if trainer_ranks is None:
        trainer_ranks = tp * (max(2, 2 * tp) if ep_spans_dp else 2)
    if trainer_ranks % tp:
        raise ConfigError(f"bad value for 'rehearse.trainer_ranks': {trainer_ranks}; allowed: a multiple of the "
                          f"miniature's TP {tp}")
    dp = trainer_ranks // tp
    ep = 1
    if moe and p.expert_parallel_size > 1:
        ep = max(e for e in (1, 2, 4) if e <= min(p.expert_parallel_size, dp) and dp % e == 0
                 and TINY_MOE["num_experts"] % e == 0)
    if moe and p.expert_parallel_size > 1 and ep == 1:
        raise ConfigError(f"bad value for 'rehearse.trainer_ranks': {trainer_ranks}; allowed: a multiple of "
                          f"{2 * tp} (TP {tp} x a DP that EP 2 divides): the recipe's expert parallelism "
                          f"(EP {p.expert_parallel_size}) would not be rehearsed at DP {dp}")
    engines = min(rc.cluster.ray.rollout_workers if rc.cluster.ray.enabled else 1, rollout_engines)
    layout = rc.cluster.ray.layout if rc.cluster.ray.enabled else "split"
    if nodes is None:  # the recipe's trainer nodes (16 ranks on 8-GPU nodes: 2), at most one per block, + engines
        real_nodes = -(-(rc.cluster.ray.trainer_workers if rc.cluster.ray.enabled else _dp(rc)
                         * p.tensor_parallel_size) // max(rc.cluster.gpus_per_node, 1))
        nodes = max(1, min(real_nodes, trainer_ranks // block_size(tp, ep))) + (layout == "split")
    tiny = TINY_MOE if moe else TINY_DENSE
    gens = 4
    prompts = 2 * dp  # every DP rank trains rows
    over = ["device=cpu", "model.name_or_path=null", "model.tokenizer=null", "cluster.gpus_per_node=0",
            "cluster.gpu_memory_gb=0",
            f"cluster.nodes={nodes}", "cluster.ray.enabled=true", f"cluster.ray.layout={layout}",
            f"cluster.ray.trainer_workers={trainer_ranks}", f"cluster.ray.rollout_workers={engines}",
            "cluster.ray.cpus_per_worker=1", "cluster.ray.address=null",
            f"policy.tensor_parallel_size={tp}", f"policy.expert_parallel_size={ep}",
            "policy.pipeline_parallel_size=1", "policy.context_parallel_size=1",
            "policy.sequence_parallel=false", "policy.use_distributed_optimizer=null", "policy.attention=auto",
            "rollout.backend=torch", f"rollout.num_generations={gens}",
            "rollout.max_new_tokens=6", "data.dataset=sanity_add", "data.eval_path=null",
            f"data.prompts_per_step={prompts}", "data.num_problems=64",
            "reward.name=exact_match", f"trainer.max_steps={steps}",
            # a short SFT warm start (cached) so rewards vary within groups and the RL steps move the weights
            "warm_start.enabled=true", "warm_start.steps=70", "warm_start.lr=1.0e-3", "warm_start.batch_size=32",
            "trainer.save_every=0", "trainer.eval_every=0", "trainer.headroom_every=0", "trainer.export_hf=false",
            "trainer.resume=never", "logging.tensorboard=false", "logging.wandb.enabled=false",
            "logging.mlflow.enabled=false", "logging.progress=false", "trainer.log_every=1"]
    cpu_ep_spans_dp = moe and ep > tp  # megatron's CPU allgather dispatcher: equal widths over the EP group
    if cpu_ep_spans_dp:
        over.append("policy.sequence_packing=false")
    over += [f"model.config.{k}={v}" for k, v in tiny.items()]
    over += _schema_defaults({"rollout": ("tensor_parallel_size", "gpu_memory_utilization", "enforce_eager",
                                          "refit_bucket_mb"),  # vLLM only: back to their defaults
                              "data": ("path", "prompt_key", "answer_key", "template")})  # jsonl only
    sp_note = ("off (the recipe: on): megatron's sequence parallelism needs Transformer Engine, which has no CPU "
               "build; its width padding is unit-tested (tests/unit/policy/megatron/test_sequence_parallel.py)"
               if p.sequence_parallel else "off (as the recipe)")
    notes = [
        f"trainer: {p.backend} TP {p.tensor_parallel_size} x DP {_dp(rc)} (EP {p.expert_parallel_size}) -> "
        f"TP {tp} x DP {dp} (EP {ep}) on {trainer_ranks} CPU ranks over gloo (NCCL not exercised)"
        + (f"; an EP group covers {-(-ep // tp)} TP group(s) (DP ranks with their own rows), in the recipe "
           f"{-(-p.expert_parallel_size // p.tensor_parallel_size)}" if moe and ep > 1 else ""),
        f"sequence parallel: {sp_note}",
        f"activation recompute: {'on' if p.activation_checkpointing else 'off'} (as the recipe)",
        "sequence packing: " + ("off (the recipe: on): on CPU megatron's allgather MoE dispatcher needs equal "
                                "micro-batch widths over an EP group spanning DP ranks; packing is unit-tested "
                                "(tests/unit/policy/test_packing.py)" if cpu_ep_spans_dp and p.sequence_packing
                                else f"{'on' if p.sequence_packing and not cpu_ep_spans_dp else 'off'} (as the recipe)"),
        f"rollout: {rc.rollout.backend} x {rc.cluster.ray.rollout_workers if rc.cluster.ray.enabled else 1} at TP "
        f"{rc.rollout.tensor_parallel_size} -> torch engine x {engines} at TP 1, each in its own Ray actor "
        "(vLLM and its TP > 1 executor not exercised)",
        f"Ray: {layout} layout on a simulated {nodes}-node CPU cluster (recipe: {rc.cluster.nodes} nodes x "
        f"{rc.cluster.gpus_per_node} GPUs)",
        f"model: {rc.model.name_or_path or 'config-built'} -> tiny {tiny['model_type']} built from a config "
        f"({tiny['num_hidden_layers']} layers, hidden {tiny['hidden_size']}"
        + (f", {tiny['num_experts']} experts top-{tiny['num_experts_per_tok']})" if moe else ")"),
        f"data: {rc.data.dataset} -> sanity_add (70-step SFT warm start), {prompts} prompts x {gens} generations, "
        f"{steps} steps; precision {rc.precision.name}, {rc.algorithm.name} as the recipe",
    ]
    return over, notes


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _schema_defaults(keys: dict[str, tuple[str, ...]]) -> list[str]:
    """`section.key=<schema default>` overrides (keys the miniature's backends do not read must stay default)."""
    from nemo_rl_fp16.config.schema import RecipeConfig as Schema

    out = []
    for section, names in keys.items():
        fields = Schema.model_fields[section].annotation.model_fields
        for name in names:
            value = fields[name].default
            out.append(f"{section}.{name}=" + ("null" if value is None else str(value).lower()
                                               if isinstance(value, bool) else str(value)))
    return out


def _dp(rc: RecipeConfig) -> int:
    p = rc.policy
    world = rc.cluster.ray.trainer_workers if rc.cluster.ray.enabled else rc.cluster.nodes * max(rc.cluster.gpus_per_node, 1)
    return max(world // (p.tensor_parallel_size * p.pipeline_parallel_size * p.context_parallel_size), 1)


def block_size(tp: int, ep: int) -> int:
    """The largest rank block to keep inside one node (`placement.locality_groups`: TP, EP), 1 for none.

    Args:
        tp (int): tensor-parallel size.
        ep (int): expert-parallel size.

    Returns:
        int: the block size (>= 1).
    """
    from nemo_rl_fp16.distributed.placement import locality_groups

    return max(locality_groups(tp, 1, ep), default=1)


def node_sizes(trainers: int, engines: int, nodes: int, block: int, layout: str) -> list[int]:
    """One-CPU slots per simulated node: trainer nodes hold whole TP/EP blocks, the engines the last node.

    The split layouts of the big recipes put the trainer ranks on their own nodes and the vLLM
    engines on others; so does the miniature (for `nodes >= 2`), with each trainer node sized to a
    multiple of `block` so Ray's PACK strategy has no reason to cut a block (the run's node-aware
    rank order then keeps each block inside a node, `placement.node_local_ranks`).

    Args:
        trainers (int): trainer ranks.
        engines (int): rollout engines.
        nodes (int): simulated nodes (>= 1).
        block (int): the largest rank block to keep inside a node (`block_size`).
        layout (str): `split` or `colocated` (colocated: every node alike).

    Returns:
        list[int]: CPU slots of each node, node 0 first.
    """
    if layout != "split" or nodes < 2:
        return [-(-(trainers + engines) // nodes)] * nodes
    per = -(-trainers // (nodes - 1))
    return [-(-per // block) * block] * (nodes - 1) + [engines]


@contextlib.contextmanager
def simulated_cluster(sizes: list[int]) -> Iterator[list[str]]:
    """A local Ray cluster of simulated nodes (`ray.cluster_utils.Cluster`), connected; torn down on exit.

    Args:
        sizes (list[int]): logical CPUs each node offers (may exceed the machine's cores), node 0 (the head) first.

    Yields:
        list[str]: the node ids, node 0 first.

    Raises:
        ConfigError: Ray is missing or already initialised in this process.
    """
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError as e:
        raise ConfigError("the rehearsal needs Ray: pip install 'nemo-rl-fp16[ray]'") from e
    if ray.is_initialized():
        raise ConfigError("the rehearsal starts its own simulated Ray cluster; this process is already connected to "
                          "Ray (call it from a fresh process)")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": sizes[0], "include_dashboard": False})
    try:
        for n in sizes[1:]:
            cluster.add_node(num_cpus=n)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield [n.node_id for n in cluster.list_all_nodes()]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def tp_replica_check(policy) -> tuple[dict[str, float], list[tuple[int, ...]]]:
    """Compare, bitwise, the parameters every TP rank holds whole (norms, routers) across each TP group.

    Args:
        policy: the run's `RayPolicyGroup` over megatron trainer ranks.

    Returns:
        tuple[dict[str, float], list[tuple[int, ...]]]: `rehearsal/tp_replicated_params` (parameters
            compared per rank) and `rehearsal/tp_replica_mismatches` (parameters that differ between
            ranks of one TP group); and the TP groups (global ranks each).
    """
    import ray
    import torch

    answers = ray.get([w.call.remote("policy", "tp_replicated_params") for w in policy.workers])
    mismatches = 0
    for ranks, params in answers:
        first = answers[ranks[0]][1]
        mismatches += sum(not torch.equal(first[k], v) for k, v in params.items())
    groups = sorted({tuple(ranks) for ranks, _ in answers})
    return ({"rehearsal/tp_replicated_params": float(len(answers[0][1])),
             "rehearsal/tp_replica_mismatches": float(mismatches)}, groups)


def rehearse(recipe: str, overrides: list[str], console: Console | None = None,
             output_dir: str | None = None) -> dict[str, float]:
    """Run a recipe's miniature (`miniature`) for its steps on a simulated multi-node CPU Ray cluster.

    Args:
        recipe (str): a packaged recipe name or a YAML path (the real, big recipe).
        overrides (list[str]): `rehearse.<option>=N` (`OPTIONS`) and recipe overrides, applied
            before the miniature's (so they shape what is shrunk).
        console (Console | None): where the run reports.
        output_dir (str | None): the run folder (default: an `output_dir=` override, else a fresh
            temporary folder).

    Returns:
        dict[str, float]: the last step's metrics, `run/wall_s`, the TP replica check
            (`tp_replica_check`, megatron only) and `rehearsal/nodes_used` (distinct nodes of the actors).

    Raises:
        ConfigError: a bad option, or the miniature is refused by the validation stage.
    """
    from nemo_rl_fp16.commands.rl import run

    console = console or Console()
    opts, rest = split_options(overrides)
    real = typed(load_recipe(recipe, rest))
    over, notes = miniature(real, trainer_ranks=opts["trainer_ranks"], rollout_engines=opts["rollout_engines"],
                            steps=opts["steps"], nodes=opts["nodes"])
    replaced_overrides(rest, over)
    given = [x.split("=", 1)[1] for x in rest if x.startswith("output_dir=")]
    out = output_dir or (given[-1] if given else tempfile.mkdtemp(prefix=f"rehearse_{real.recipe}_"))
    cfg: DictConfig = load_recipe(recipe, [*rest, *over, f"output_dir={out}"])
    mini = typed(cfg)
    console.print(f"rehearsal of {real.recipe}: its layout kinds, shrunk, on CPU", highlight=False)
    for line in notes:
        console.print(f"  {line}", soft_wrap=True, highlight=False)
    ray_cfg = mini.cluster.ray
    sizes = node_sizes(ray_cfg.trainer_workers, ray_cfg.rollout_workers, mini.cluster.nodes,
                       block_size(mini.policy.tensor_parallel_size, mini.policy.expert_parallel_size), ray_cfg.layout)
    found: dict[str, float] = {}

    def inspect(setup) -> dict[str, float]:
        names = {n: f"node{i}" for i, n in enumerate(node_ids)}
        ranks = [names.get(n, n[:8]) for n in setup.policy.nodes]
        engines = [names.get(n, n[:8]) for n in setup.rollout.nodes]
        console.print(f"placement: trainer ranks {dict(enumerate(ranks))}; rollout engines "
                      f"{dict(enumerate(engines))}", soft_wrap=True, highlight=False)
        found["rehearsal/nodes_used"] = float(len(set(ranks + engines)))
        if mini.policy.backend == "megatron":
            check, groups = tp_replica_check(setup.policy)
            found.update(check)
            across = [g for g in groups if len({ranks[r] for r in g}) > 1]
            found["rehearsal/tp_groups_across_nodes"] = float(len(across))
            console.print("TP groups: " + "; ".join(
                f"ranks {list(g)} on {sorted({ranks[r] for r in g})}" for g in groups)
                + (f" ({len(across)} span nodes: every TP collective crosses the network)" if across else ""),
                soft_wrap=True, highlight=False)
        return found

    with simulated_cluster(sizes) as node_ids:
        metrics = run(cfg, console=console, inspect=inspect)
    for row in _rows(Path(out) / "metrics.jsonl"):
        console.print(f"step {row['step']}: " + "  ".join(f"{k} {row[k]:.4g}" for k in STEP_KEYS if k in row),
                      soft_wrap=True, highlight=False)
    if "rehearsal/tp_replica_mismatches" in metrics:
        console.print(f"TP replicas: {metrics['rehearsal/tp_replicated_params']:.0f} replicated parameters per rank, "
                      f"{metrics['rehearsal/tp_replica_mismatches']:.0f} differ across a TP group", highlight=False)
    console.print(f"rehearsal of {real.recipe}: {mini.trainer.max_steps} RL steps done in "
                  f"{metrics['run/wall_s']:.0f} s; outputs in {out}", highlight=False)
    return metrics


def main(recipe: str, overrides: list[str], dry_run: bool) -> int:
    """`nemo-rl-fp16 rehearse`: the recipe's miniature on a simulated cluster (with `dry_run`: its plan only).

    Args:
        recipe (str): a packaged recipe name or a YAML path.
        overrides (list[str]): `rehearse.<option>=N` and recipe overrides.
        dry_run (bool): print the miniature's plan (the `rl` dry run of it) and exit.

    Returns:
        int: the exit code (0; errors are raised and mapped by `cli.run_command`).
    """
    if dry_run:
        from nemo_rl_fp16.commands.validate import validate

        opts, rest = split_options(overrides)
        real = typed(load_recipe(recipe, rest))
        over, notes = miniature(real, trainer_ranks=opts["trainer_ranks"], rollout_engines=opts["rollout_engines"],
                                steps=opts["steps"], nodes=opts["nodes"])
        replaced_overrides(rest, over)
        Console().print(f"rehearsal of {real.recipe}: its layout kinds, shrunk, on CPU", highlight=False)
        for line in notes:
            Console().print(f"  {line}", soft_wrap=True, highlight=False)
        validate("rl", load_recipe(recipe, [*rest, *over]), dry_run=True)
        return 0
    metrics = rehearse(recipe, overrides)
    return 0 if metrics.get("rehearsal/tp_replica_mismatches", 0.0) == 0 else 1
