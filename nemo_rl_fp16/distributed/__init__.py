"""Scale-out: trainer ranks and rollout engines as Ray actors (`cluster.ray.*`)."""

from nemo_rl_fp16.distributed.placement import ActorSlot, Placement, plan_placement
from nemo_rl_fp16.distributed.ray_engines import RayEngines, RayPolicyGroup, RayRolloutGroup

__all__ = ["ActorSlot", "Placement", "plan_placement", "RayEngines", "RayPolicyGroup", "RayRolloutGroup"]
