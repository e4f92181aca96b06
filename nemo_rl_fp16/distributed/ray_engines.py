"""Trainer ranks and rollout engines as Ray actors, behind the same two protocols as in-process engines.

`RayEngines` (built by `assembly.build_run` when `cluster.ray.enabled=true`) places actors as
`placement.plan_placement` says, in one Ray placement group (PACK); trainer ranks are numbered
from the nodes Ray chose (`trainer_rank_order`: megatron's TP / EP rank blocks inside one node):

- `PolicyWorker` x `trainer_workers`: one torch.distributed rank each (gloo on CPU, NCCL on GPU),
  running the recipe's trainer (`policy.build_policy`: FSDP2 data parallel for the torch
  backend, megatron-core for `policy.backend=megatron`), plus the frozen reference policy on the
  same ranks when `algorithm.kl_coef > 0`. `RayPolicyGroup` is the loop's
  `PolicyEngine`: every call goes to every rank (the collectives need all of them) and rank 0's
  answer comes back.
- `RolloutWorker` x `rollout_workers`: one rollout engine each (`rollout.build_rollout_engine`).
  `RayRolloutGroup` is the loop's `RolloutEngine`: it splits a step's prompts between the engines
  (whole prompt groups), stacks their batches, and refits them from the trainer ranks directly
  (`refit_from`, `ray_refit.py`: trainer rank 0 pushes buckets to every engine; the driver never
  holds the weights). Colocated, it puts engines to sleep after generating; a refit first has the
  trainer ranks free their cached memory, then wakes the engines' weights only, and `generate`
  wakes the KV cache.

The loop's loss (`algorithms.BoundLoss`, a dataclass of tensors) travels to the workers by Ray's
pickle (code of this package, not a network service: vLLM's insecure serialization is not
involved). Results come back on the CPU.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nemo_rl_fp16.config import ConfigError, RecipeConfig
from nemo_rl_fp16.distributed.placement import (
    Placement,
    locality_groups,
    node_local_ranks,
    plan_placement,
    split_blocks,
)
from nemo_rl_fp16.distributed.ray_ipc_refit import check_pairs, merge_stats
from nemo_rl_fp16.distributed.ray_refit import choose_transport, open_group
from nemo_rl_fp16.distributed.workers import PolicyWorker, RolloutWorker
from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, SamplingParams, TrainStepResult
from nemo_rl_fp16.precision import PrecisionPolicy


def rank_groups(rc: RecipeConfig) -> list[int]:
    """The trainer's rank-block sizes to keep inside one node (`placement.locality_groups`).

    Args:
        rc (RecipeConfig): the typed recipe (`policy.backend` and its parallel sizes).

    Returns:
        list[int]: TP, EP, TP x CP block sizes of the megatron backend; empty for the torch backend
        (FSDP2 data parallel only: any order, nodes still filled one after another).
    """
    p = rc.policy
    if p.backend != "megatron":
        return []
    return locality_groups(p.tensor_parallel_size, p.context_parallel_size, p.expert_parallel_size)


def trainer_rank_order(pg: Any, placement: Placement, groups: list[int]) -> tuple[list, list[str]]:
    """The trainer slots in rank order, from the nodes Ray put their bundles on (`node_local_ranks`).

    Args:
        pg: a ready Ray placement group of `placement.bundles`.
        placement (Placement): the plan whose trainer slots are ordered.
        groups (list[int]): rank-block sizes to keep inside one node (`rank_groups`).

    Returns:
        tuple[list[ActorSlot], list[str]]: `placement.role("trainer")` re-ordered (entry r is trainer
        rank r's slot, its `rank` field set to r), and the node id of each rank.
    """
    from ray.util import placement_group_table

    node_of = placement_group_table(pg)["bundles_to_node_id"]
    slots = placement.role("trainer")
    ranks = node_local_ranks([node_of[s.bundle] for s in slots], groups)
    ordered = [None] * len(slots)
    for slot, rank in zip(slots, ranks, strict=True):
        ordered[rank] = dataclasses.replace(slot, rank=rank)
    return ordered, [node_of[s.bundle] for s in ordered]


class RayPolicyGroup:
    """`PolicyEngine` over the trainer ranks: each call runs on every rank, rank 0 answers.

    Every protocol method (`interfaces.PolicyEngine`) is forwarded to all ranks, since the
    collectives need all of them; `audit` unions the ranks' findings.
    """

    def __init__(self, workers: list, precision: PrecisionPolicy, target: str = "policy"):
        """Wrap `workers` (`PolicyWorker` handles); `target` picks their `policy` or `reference` engine.

        Args:
            workers (list): the `PolicyWorker` actor handles, in rank order.
            precision (PrecisionPolicy): the trainer side's dtypes (the protocol's `precision`).
            target (str): `policy` or `reference`.
        """
        self.workers = workers
        self.precision = precision
        self.target = target
        self.nodes: list[str] = []  # the Ray node id of each rank (set by `RayEngines`)

    def _all(self, method: str, *args: Any) -> list:
        import ray

        refs = [ray.put(a) for a in args]  # one object-store copy, read by every rank
        return ray.get([w.call.remote(self.target, method, *refs) for w in self.workers])

    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """`[N, T]` fp32 log π of the batch's response tokens (rank 0's answer).

        Args:
            batch (RolloutBatch): `N` rows of `[P + T]` tokens.
            temperature (float): the sampling temperature T° (log-probs of `logits / T°`).

        Returns:
            torch.Tensor: `[N, T]` fp32 log π, 0 where `response_mask` is 0.
        """
        return self._all("logprobs", batch, temperature)[0]

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
        """One optimizer step on every rank (each its data-parallel share); rank 0's result.

        Args:
            batch (RolloutBatch): the whole optimizer batch (every rank receives it and takes its share).
            loss_fn (LossFn): the update's loss (`algorithms.PolicyLossFn.bind`).
            temperature (float): the sampling temperature T°.

        Returns:
            TrainStepResult: rank 0's loss, grad norm, loss scale, skip flag and metrics.
        """
        return self._all("train_step", batch, loss_fn, temperature)[0]

    def selected_experts(self, batch: RolloutBatch) -> torch.Tensor:
        """`[N, T, moe layers, k]` expert ids π's routers pick (rank 0's answer).

        Args:
            batch (RolloutBatch): `N` rows with responses of width `T`.

        Returns:
            torch.Tensor: `[N, T, moe layers, k]` int16 expert ids, -1 on padding.
        """
        return self._all("selected_experts", batch)[0]

    def back_off_loss_scale(self, used_scale: float) -> bool:
        """Lower every rank's loss scale below `used_scale`; False when it cannot go lower.

        Args:
            used_scale (float): the loss scale of the overflowing step.

        Returns:
            bool: rank 0's answer: True when the scale was lowered, False at its floor or without loss scaling.
        """
        return self._all("back_off_loss_scale", used_scale)[0]

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights in the rollout dtype, HF names (rank 0's answer).

        Returns:
            dict[str, torch.Tensor]: HF name -> full tensor in the rollout's `param_dtype`, on the CPU.
        """
        return self._all("rollout_state_dict")[0]

    def activation_headroom(self, batch: RolloutBatch) -> dict[str, float]:
        """fp16 activation headroom metrics of the whole batch (rank 0's answer, the same on every rank).

        Each rank runs its data-parallel share and the ranks all-reduce (`MicroBatchLoop.activation_headroom`).

        Args:
            batch (RolloutBatch): the rows to run a no-grad forward over.

        Returns:
            dict[str, float]: the `precision/*` headroom metrics (`ActivationMonitor`).
        """
        return self._all("activation_headroom", batch)[0]

    def audit(self) -> list[str]:
        """Precision findings of all ranks, de-duplicated and sorted (empty = clean).

        Returns:
            list[str]: one line per precision finding, sorted; empty when every rank is clean.
        """
        return sorted({line for lines in self._all("audit") for line in lines})

    def state_dict(self) -> dict:
        """Checkpoint state (`model` + optimizer/scaler), gathered to rank 0.

        Returns:
            dict: `{"model", "optimizer", "scaler"}` as `PolicyEngine.state_dict` (full on rank 0).
        """
        return self._all("state_dict")[0]

    def load_state_dict(self, state: dict) -> None:
        """Load checkpoint state on every rank.

        Args:
            state (dict): a `state_dict()` (every rank receives the full state).
        """
        self._all("load_state_dict", state)


class RayRolloutGroup:
    """`RolloutEngine` over the rollout workers: prompts split between them, batches stacked."""

    def __init__(self, workers: list, precision: PrecisionPolicy, pad_token_id: int, colocated: bool,
                 bucket_bytes: int = 256 * 2**20, transport: str = "object_store", device: str = "cpu",
                 engine_of_rank: list[int | None] | None = None):
        """Wrap `workers` (`RolloutWorker` handles); colocated engines sleep between rollouts; refit buckets of `bucket_bytes`.

        Args:
            workers (list): the `RolloutWorker` actor handles.
            precision (PrecisionPolicy): the rollout side's dtypes (the protocol's `precision`).
            pad_token_id (int): pads the engines' batches to one width in `generate`.
            colocated (bool): the engines share GPUs with trainer ranks (they sleep after each rollout).
            bucket_bytes (int): the refit bucket size (`rollout.refit_bucket_mb`).
            transport (str): `object_store`, `broadcast` or `ipc` (`ray_refit.choose_transport`).
            device (str): `cuda` (a broadcast group on NCCL) or `cpu` (gloo).
            engine_of_rank (list[int | None] | None): `ipc` only: entry r is the engine on trainer rank
                r's bundle (None: none there); every engine must appear once (`ray_ipc_refit.check_pairs`).
        """
        self.workers = workers
        self.precision = precision
        self.pad_token_id = pad_token_id
        self.colocated = colocated
        self.bucket_bytes = int(bucket_bytes)
        self.nodes: list[str] = []  # the Ray node id of each engine (set by `RayEngines`)
        self._asleep = False
        self.transport, self.device, self._group = transport, device, False
        self.engine_of_rank = engine_of_rank
        if transport == "ipc":
            check_pairs(engine_of_rank or [], len(workers))
        #: bytes all engines received in the last refit and its transport (metrics `refit/bytes`, `refit/mode`)
        self.last_refit_bytes: int | None = None
        self.last_refit_transport: str | None = None

    def _wake(self, tags: list[str] | None = None) -> None:
        import ray

        if self._asleep:
            ray.get([w.wake_up.remote(tags) for w in self.workers])
            self._asleep = tags is not None  # woken partly: the KV cache comes back before generating

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Engine i samples prompts `chunk_i` (contiguous) with seed `runtime.engine_seed(params.seed, i)`.

        Args:
            prompts (list[list[int]]): the prompts' token ids.
            params (SamplingParams): the sampling settings (engine i uses seed `runtime.engine_seed(params.seed, i)`).

        Returns:
            RolloutBatch: the engines' batches concatenated in prompt order, padded with `pad_token_id`.
        """
        import ray

        self._wake()
        n = len(self.workers)
        bounds = [len(prompts) * i // n for i in range(n + 1)]
        from nemo_rl_fp16.runtime import engine_seed

        jobs = [(w, prompts[lo:hi], dataclasses.replace(params, seed=engine_seed(params.seed, i)))
                for i, (w, lo, hi) in enumerate(zip(self.workers, bounds, bounds[1:], strict=False)) if hi > lo]
        batches = ray.get([w.call.remote("generate", chunk, p) for w, chunk, p in jobs])
        if self.colocated:
            self._asleep = any(ray.get([w.sleep.remote() for w in self.workers]))
        return RolloutBatch.concat(batches, self.pad_token_id)

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Refit every engine from one object-store copy of `state_dict` (waking them first; the loop uses `refit_from`).

        Args:
            state_dict (dict[str, torch.Tensor]): HF name -> tensor in the rollout dtype (`rollout_state_dict`).
        """
        import ray

        self._wake(["weights"])
        ref = ray.put(state_dict)
        ray.get([w.call.remote("update_weights", ref) for w in self.workers])
        self.last_refit_bytes, self.last_refit_transport = None, None

    def refit_from(self, policy: RayPolicyGroup, step: int) -> None:
        """Refit every engine straight from the trainer ranks (`ray_refit.py`); the driver holds no weights.

        Order: trainer ranks free their cache, engines wake their weights only, every rank runs
        `push_weights` (rank 0 sends buckets to the engines), the engines finish. Transport `ipc`:
        every rank runs `push_ipc` instead (`ray_ipc_refit.py`: rank 0's buckets relayed over the
        trainers' group, each rank hands the engine on its bundle a handle per bucket).

        Args:
            policy: the trainer ranks.
            step: the RL step (for the non-finite message).

        Raises:
            NonFiniteError: a weight is NaN/inf or beyond the rollout dtype; nothing was sent.
        """
        import ray

        ray.get([w.free_cache.remote() for w in policy.workers])
        self._wake(["weights"])
        if self.transport == "broadcast" and not self._group:  # once: rank 0 + the engines (`ray_refit.open_group`)
            open_group(policy.workers, self.workers, self.device)
            self._group = True
        if self.transport == "ipc":  # each rank hands the engine on its bundle a handle per bucket
            engines = [None if j is None else self.workers[j] for j in self.engine_of_rank]
            stats = ray.get([w.push_ipc.remote(e, self.precision.param_dtype, self.bucket_bytes, step, self.device)
                             for w, e in zip(policy.workers, engines, strict=True)])
            self.last_refit_bytes, self.last_refit_transport = merge_stats(stats)
            return
        stats = ray.get([w.push_weights.remote(self.workers, self.precision.param_dtype, self.bucket_bytes, step)
                         for w in policy.workers])
        self.last_refit_bytes, self.last_refit_transport = stats[0]

    def audit(self) -> list[str]:
        """Precision findings of all engines, de-duplicated and sorted (empty = clean).

        Returns:
            list[str]: one line per precision finding, sorted; empty when every engine is clean.
        """
        import ray

        return sorted({line for lines in ray.get([w.call.remote("audit") for w in self.workers]) for line in lines})


def _slot_nodes(pg: Any, placement: Placement) -> tuple[list[str], list[str]]:
    """The Ray node id each trainer rank and each rollout engine landed on (its bundle's node), in rank order."""
    from ray.util import placement_group_table

    bundle_node = placement_group_table(pg)["bundles_to_node_id"]
    return ([bundle_node[s.bundle] for s in placement.role("trainer")],
            [bundle_node[s.bundle] for s in placement.role("rollout")])


class RayEngines:
    """Starts (or joins) Ray, places the actors, builds both groups; `close()` releases everything."""

    def __init__(self, rc: RecipeConfig, model_cfg: dict, train_pol: PrecisionPolicy, rollout_pol: PrecisionPolicy,
                 tokenizer: Any, init: dict | None, model_dir: Path, device: str, console: Console | None = None):
        """Start or join Ray, place the actors, build `policy`, `reference` and `rollout`.

        Args:
            rc (RecipeConfig): the typed recipe (`cluster.ray.*` sizes the placement).
            model_cfg (dict): the recipe's `model:` block.
            train_pol (PrecisionPolicy): the trainer side's dtypes.
            rollout_pol (PrecisionPolicy): the rollout engines' dtypes.
            tokenizer: the run's tokenizer.
            init (dict | None): fp32 starting weights (None = `model.name_or_path`).
            model_dir (Path): where vLLM engines write config-built models (`r<j>` each).
            device (str): the run's device (`plan.run_device`).
            console (Console | None): where the placement is reported.

        Raises:
            ConfigError: Ray is missing, the placement is invalid, or the cluster cannot place it.
        """
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ConfigError("cluster.ray.enabled=true needs Ray: pip install 'nemo-rl-fp16[ray]'") from e
        console = console or Console()
        r = rc.cluster.ray
        gpus = rc.cluster.gpus_per_node > 0
        self.device = device  # the plan's rule, `plan.run_device` (auto: cuda iff cluster.gpus_per_node > 0 under Ray)
        try:
            self.placement: Placement = plan_placement(r.layout, r.trainer_workers, r.rollout_workers, gpus=gpus,
                                                       cpus_per_worker=r.cpus_per_worker,
                                                       rollout_tp=rc.rollout.tensor_parallel_size)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        try:  # the refit transport, refused here (before Ray starts) where it cannot work
            transport = choose_transport(rc.rollout.refit_transport, device, r.layout)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._remove_pg = remove_placement_group
        self._started_ray = False
        if not ray.is_initialized():
            if r.address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=r.address, log_to_driver=False)
            else:  # a local Ray for this run: CPUs sized to the placement (may exceed the cores), GPUs detected
                need_cpus = max(int(self.placement.total.get("CPU", 1) + 0.999), 1)
                # address="local": always a new instance (address=None joins any Ray already running on this host)
                ray.init(address="local", num_cpus=need_cpus, include_dashboard=False, log_to_driver=False)
                self._started_ray = True
        self.pg = placement_group(self.placement.bundles, strategy="PACK")
        self.workers: list = []
        try:
            try:
                ray.get(self.pg.ready(), timeout=120)
            except Exception as e:
                raise ConfigError(f"Ray cannot place {self.placement.total} (cluster.ray: {r.trainer_workers} trainer "
                                  f"ranks, {r.rollout_workers} rollout engines, {r.layout}); the cluster has "
                                  f"{ray.cluster_resources()}") from e

            def actor(cls, slot):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=slot.bundle)
                handle = ray.remote(cls).options(num_cpus=slot.num_cpus, num_gpus=slot.num_gpus,
                                                 scheduling_strategy=strategy).remote(int(max(1.0, slot.num_cpus)))
                self.workers.append(handle)
                return handle

            #: trainer slots in rank order: TP / EP blocks inside one node where they fit (`trainer_rank_order`)
            self.trainer_slots, rank_nodes = trainer_rank_order(self.pg, self.placement, rank_groups(rc))
            for line in split_blocks(rank_nodes, rank_groups(rc)):  # no node had room for the whole block
                console.print(f"[yellow]warning: ray placement: TP/EP {line}: its collectives cross the network")
            trainers = [actor(PolicyWorker, s) for s in self.trainer_slots]
            addr, port = ray.get(trainers[0].rendezvous.remote())
            backend = "nccl" if self.device == "cuda" else "gloo"
            init_ref = ray.put(init)
            with_ref = rc.algorithm.kl_coef > 0
            kinds = ray.get([w.setup.remote(rank, len(trainers), addr, port, backend, rc, model_cfg, train_pol,
                                            self.device, init_ref, with_ref) for rank, w in enumerate(trainers)])
            self.policy = RayPolicyGroup(trainers, train_pol)
            self.reference = RayPolicyGroup(trainers, train_pol, target="reference") if with_ref else None
            rollouts = [actor(RolloutWorker, s) for s in self.placement.role("rollout")]
            ray.get([w.setup.remote(rc, rollout_pol, model_cfg, tokenizer, self.device, init_ref,
                                    str(model_dir / f"r{j}")) for j, w in enumerate(rollouts)])
            self.rollout = RayRolloutGroup(rollouts, rollout_pol, tokenizer.pad_token_id,
                                           colocated=r.layout == "colocated",
                                           bucket_bytes=int(rc.rollout.refit_bucket_mb * 2**20),
                                           transport=transport, device=self.device,
                                           engine_of_rank=[next((s.rank for s in self.placement.role("rollout")
                                                                 if s.bundle == t.bundle), None)
                                                           for t in self.trainer_slots])
            self.rollout.refit_from(self.policy, 0)  # the engines start from the trainers' own weights
        except BaseException:
            self.close()
            raise
        console.print(f"ray: {len(trainers)} x {kinds[0]} ranks ({backend}) + {len(rollouts)} rollout engines, "
                      f"{r.layout} on {self.device}")
        self.policy.nodes, self.rollout.nodes = _slot_nodes(self.pg, self.placement)
        console.print(f"placement: trainer ranks -> nodes {[n[:8] for n in self.policy.nodes]}; rollout engines -> "
                      f"nodes {[n[:8] for n in self.rollout.nodes]}", soft_wrap=True, highlight=False)

    def close(self) -> None:
        """Kill the actors, remove the placement group, shut down a Ray this run started."""
        import ray

        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: S110 - best effort on teardown
                pass
        self.workers = []
        if getattr(self, "pg", None) is not None:
            try:
                self._remove_pg(self.pg)
            except Exception:  # noqa: S110
                pass
            self.pg = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
