"""Where the Ray actors go: placement-group bundles and each actor's share of one (pure planning).

Two layouts (the recipe's `cluster.ray.layout`), as NeMo-RL and verl name them:

- `colocated`: one bundle per trainer rank; rollout engine j shares bundle j with trainer rank j
  (each actor asks for half the bundle's CPUs and, on GPUs, half its GPU: Ray's fractional GPUs
  put both on the same device). The rollout engine sleeps while the trainers train, where the
  engine supports it (vLLM's sleep mode on GPU). Rollout engines must be single-GPU here and no
  more numerous than the trainer ranks.
- `split`: trainer bundles, then one bundle per rollout engine sized to its tensor-parallel
  degree; every actor owns its bundle.

Which trainer rank goes on which bundle is decided once Ray has placed the bundles on nodes:
`node_local_ranks` (megatron's TP / EP rank blocks, `locality_groups`, inside one node where they
fit; `split_blocks` names the ones that could not be).

Kept free of Ray so the layouts and the rank order are unit-tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("colocated", "split")


@dataclass(frozen=True)
class ActorSlot:
    """One actor: its role and rank, its bundle, and what it asks of that bundle."""

    role: str  # "trainer" | "rollout"
    rank: int
    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class Placement:
    """Where every actor of a run goes: one Ray placement group of `bundles`, one slot per actor.

    Attributes:
        layout (str): `colocated` (trainers and rollout engines share GPUs) or `split`.
        bundles (list[dict[str, float]]): the placement group's bundles (`CPU`, `GPU` amounts).
        slots (list[ActorSlot]): each actor's role and bundle.
    """

    layout: str
    bundles: list[dict[str, float]]
    slots: list[ActorSlot]

    def role(self, role: str) -> list[ActorSlot]:
        """The slots of one role (`trainer` or `rollout`), in rank order.

        Args:
            role (str): `trainer` or `rollout`.

        Returns:
            list[ActorSlot]: that role's slots, in rank order.
        """
        return [s for s in self.slots if s.role == role]

    @property
    def total(self) -> dict[str, float]:
        """Resources of all bundles together (`CPU`, `GPU`)."""
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def plan_placement(layout: str, trainer_workers: int, rollout_workers: int, *, gpus: bool,
                   cpus_per_worker: float = 1.0, rollout_tp: int = 1) -> Placement:
    """Bundles and actor slots for `layout` (raises ValueError with the fix on an impossible layout).

    Args:
        layout (str): `colocated` (each rollout engine shares a trainer rank's bundle) or `split`.
        trainer_workers (int): trainer ranks (>= 1).
        rollout_workers (int): rollout engines (>= 1).
        gpus (bool): whether the cluster has GPUs (bundles then ask for them).
        cpus_per_worker (float): CPUs per bundle.
        rollout_tp (int): GPUs per rollout engine (`rollout.tensor_parallel_size`; split layout only).

    Returns:
        Placement: the placement-group bundles and each actor's bundle index and CPU/GPU share.

    Raises:
        ValueError: an unknown layout, a worker count below 1, or a colocated layout with more
            rollout engines than trainer ranks or rollout TP > 1 on GPUs (the message names the fix).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"cluster.ray.layout must be one of {LAYOUTS}, got {layout!r}")
    if trainer_workers < 1 or rollout_workers < 1:
        raise ValueError("cluster.ray.trainer_workers and rollout_workers must be >= 1")
    gpu = 1.0 if gpus else 0.0
    if layout == "colocated":
        if rollout_workers > trainer_workers:
            raise ValueError(f"colocated layout: {rollout_workers} rollout engines need as many trainer ranks to share "
                             f"with, have {trainer_workers}; lower cluster.ray.rollout_workers or use layout=split")
        if gpus and rollout_tp != 1:
            raise ValueError(f"colocated layout places each rollout engine on one trainer GPU; rollout.tensor_parallel_"
                             f"size={rollout_tp} needs layout=split")
        bundles = [{"CPU": cpus_per_worker, **({"GPU": gpu} if gpus else {})} for _ in range(trainer_workers)]
        half_cpu, half_gpu = cpus_per_worker / 2, gpu / 2
        slots = [ActorSlot("trainer", r, r, half_cpu, half_gpu) for r in range(trainer_workers)]
        slots += [ActorSlot("rollout", j, j, half_cpu, half_gpu) for j in range(rollout_workers)]
        return Placement(layout, bundles, slots)
    bundles = [{"CPU": cpus_per_worker, **({"GPU": gpu} if gpus else {})} for _ in range(trainer_workers)]
    slots = [ActorSlot("trainer", r, r, cpus_per_worker, gpu) for r in range(trainer_workers)]
    rgpu = float(rollout_tp) if gpus else 0.0
    for j in range(rollout_workers):
        bundles.append({"CPU": cpus_per_worker, **({"GPU": rgpu} if gpus else {})})
        slots.append(ActorSlot("rollout", j, len(bundles) - 1, cpus_per_worker, rgpu))
    return Placement(layout, bundles, slots)


def locality_groups(tp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1) -> list[int]:
    """Sizes of the rank blocks to keep inside one node, most bandwidth-hungry first.

    megatron-core numbers ranks in the order `tp-cp-ep-dp-pp` (`initialize_model_parallel`'s
    default, which `policy/megatron/parallel.py` uses): a tensor-parallel group is `tp`
    consecutive ranks, a TP x CP group `tp * cp`, and an expert-parallel group (the expert rank
    generator: expert TP `etp`, then EP) `etp * ep` consecutive ranks. Each group is aligned to its
    size, so keeping every aligned block of that size on one node keeps the group there.

    Args:
        tp (int): tensor-parallel size.
        cp (int): context-parallel size.
        ep (int): expert-parallel size.
        etp (int): expert tensor-parallel size (the package uses 1).

    Returns:
        list[int]: block sizes > 1 in priority order (TP, EP, TP x CP); empty for pure data parallel.
    """
    out: list[int] = []
    for g in (tp, etp * ep, tp * cp):
        if g > 1 and g not in out:
            out.append(g)
    return out


def node_local_ranks(bundle_nodes: list[str], groups: list[int]) -> list[int]:
    """Trainer rank of each bundle, so that rank blocks of the `groups` sizes stay inside one node.

    Ray's PACK strategy gives bundle i no particular node (a 16-bundle group on 4 x 8 simulated
    GPUs landed node2, node3 x 8, node2 x 7), so rank = bundle index splits TP and EP groups
    across nodes. Here ranks go to nodes in aligned blocks, largest block size first: the sizes
    that nest (each divides the one kept before it; `groups[0]`, TP, always kept) are placed
    from the largest down, node by node (nodes by bundle count, then first appearance), as many
    whole blocks as a node holds; bundles left over go at the next smaller size, and finally one
    by one. Consecutive ranks therefore fill one node before the next, every block of a kept
    size that fits in a node is inside one, and a block is split only when no node has room for
    it (e.g. 6 + 10 bundles with EP 8: one EP group must span both nodes). NeMo-RL and verl
    likewise order workers by node (NeMo-RL sorts bundles by node IP).

    Args:
        bundle_nodes (list[str]): the node id of each trainer bundle, in bundle order
            (`ray.util.placement_group_table(pg)["bundles_to_node_id"]`).
        groups (list[int]): rank-block sizes to keep node-local, in priority order (`locality_groups`).

    Returns:
        list[int]: `ranks[b]` = the trainer rank of bundle `b`; a permutation of `0..len(bundle_nodes)-1`.

    Raises:
        ValueError: a block size below 1.
    """
    if any(g < 1 for g in groups):
        raise ValueError(f"rank-block sizes must be >= 1, got {list(groups)}")
    chain: list[int] = []
    for g in groups:  # keep sizes nested with every size kept so far, so all blocks stay aligned
        if all(g % k == 0 or k % g == 0 for k in chain):
            chain.append(g)
    pools: dict[str, list[int]] = {}
    for b, node in enumerate(bundle_nodes):
        pools.setdefault(node, []).append(b)
    nodes = sorted(pools, key=lambda n: -len(pools[n]))  # stable: ties keep first appearance
    order: list[int] = []
    for g in sorted(set(chain) | {1}, reverse=True):
        for node in nodes:
            whole = len(pools[node]) // g * g
            order += pools[node][:whole]
            pools[node] = pools[node][whole:]
    ranks = [0] * len(bundle_nodes)
    for rank, b in enumerate(order):
        ranks[b] = rank
    return ranks


def split_blocks(rank_nodes: list[str], groups: list[int]) -> list[str]:
    """The rank blocks of the `groups` sizes that span more than one node (what the run reports).

    Args:
        rank_nodes (list[str]): the node id of each trainer rank, in rank order.
        groups (list[int]): rank-block sizes that should be node-local (`locality_groups`).

    Returns:
        list[str]: one `"ranks a-b (size g) on n nodes"` per aligned block that spans nodes; empty when all are local.
    """
    out = []
    for g in groups:
        for lo in range(0, len(rank_nodes) - g + 1, g):
            n = len(set(rank_nodes[lo:lo + g]))
            if n > 1:
                out.append(f"ranks {lo}-{lo + g - 1} (size {g}) on {n} nodes")
    return out
