"""Node-aware trainer ranks on a simulated multi-node Ray cluster (issue 20).

`ray.cluster_utils.Cluster` starts one raylet per simulated node on this machine, each declaring
`cluster.gpus_per_node` GPUs (nothing here touches CUDA, so Ray need not see real ones). The
recipe's own placement (`plan_placement`) is reserved with `RayEngines`' strategy (one PACK
placement group), its trainer slots are ordered by `ray_engines.trainer_rank_order`, and one tiny
actor per trainer rank (no model) reports the node it really runs on. megatron-core's own rank
generator gives the TP and EP groups; each must sit on one node, in every trial.
"""

import pytest

from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.distributed.placement import plan_placement, split_blocks

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")
TRIALS = 3


def _megatron_groups(world: int, tp: int, ep: int) -> tuple[list, list]:
    from megatron.core.parallel_state import RankGenerator

    order = "tp-cp-ep-dp-pp"  # initialize_model_parallel's default (policy/megatron/parallel.py)
    return (RankGenerator(tp=tp, ep=1, dp=world // tp, pp=1, cp=1, order=order).get_ranks("tp"),
            RankGenerator(tp=1, ep=ep, dp=world // ep, pp=1, cp=1, order=order).get_ranks("ep"))


@pytest.mark.parametrize("recipe", ["moe_30b_a3b_fp16", "dense_14b_fp16"])
def test_tp_and_ep_groups_of_the_big_recipes_are_node_local(recipe):
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from nemo_rl_fp16.distributed.ray_engines import rank_groups, trainer_rank_order

    class Where:  # defined here so Ray ships it by value (the workers cannot import this test module)
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    rc = typed(load_recipe(recipe, []))
    r, p = rc.cluster.ray, rc.policy
    placement = plan_placement(r.layout, r.trainer_workers, r.rollout_workers, gpus=True,
                               cpus_per_worker=r.cpus_per_worker, rollout_tp=rc.rollout.tensor_parallel_size)
    world = r.trainer_workers
    tp_groups, ep_groups = _megatron_groups(world, p.tensor_parallel_size, p.expert_parallel_size)
    node_args = {"num_cpus": 16, "num_gpus": rc.cluster.gpus_per_node}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    try:
        for _ in range(rc.cluster.nodes - 1):
            cluster.add_node(**node_args)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        naive_split = 0
        for _ in range(TRIALS):
            pg = placement_group(placement.bundles, strategy="PACK")  # as RayEngines reserves it
            ray.get(pg.ready(), timeout=120)
            slots, rank_nodes = trainer_rank_order(pg, placement, rank_groups(rc))
            assert split_blocks(rank_nodes, rank_groups(rc)) == []
            assert [s.rank for s in slots] == list(range(world))
            assert sorted(s.bundle for s in slots) == [s.bundle for s in placement.role("trainer")]
            actors = [ray.remote(Where).options(
                num_cpus=s.num_cpus, num_gpus=s.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=s.bundle),
            ).remote() for s in slots]
            node_of_rank = ray.get([a.node.remote() for a in actors])
            assert node_of_rank == rank_nodes  # the actors run where the placement group table says
            for g in tp_groups + ep_groups:
                assert len({node_of_rank[i] for i in g}) == 1, (recipe, g, node_of_rank)
            table = ray.util.placement_group_table(pg)["bundles_to_node_id"]
            by_bundle = [table[s.bundle] for s in placement.role("trainer")]  # rank = bundle index (before)
            naive_split += any(len({by_bundle[i] for i in g}) > 1 for g in tp_groups + ep_groups)
            for a in actors:
                ray.kill(a)
            remove_placement_group(pg)
        print(f"{recipe}: rank = bundle index would split a TP/EP group in {naive_split} of {TRIALS} trials")
    finally:
        ray.shutdown()
        cluster.shutdown()
