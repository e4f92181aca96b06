"""Where the Ray actors go: placement-group bundles and each actor's share of one (pure planning).

Two layouts (the recipe's `cluster.ray.layout`), as NeMo-RL and verl name them:

- `colocated`: one bundle per trainer rank; rollout engine j shares bundle j with trainer rank j
  (each actor asks for half the bundle's CPUs and, on GPUs, half its GPU: Ray's fractional GPUs
  put both on the same device). The rollout engine sleeps while the trainers train, where the
  engine supports it (vLLM's sleep mode on GPU). Rollout engines must be single-GPU here and no
  more numerous than the trainer ranks.
- `split`: trainer bundles, then one bundle per rollout engine sized to its tensor-parallel
  degree; every actor owns its bundle.

Kept free of Ray so the layouts are unit-tested without a cluster.
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
