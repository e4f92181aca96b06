"""Ray placement plans (pure: no cluster needed)."""

import pytest

from nemo_rl_fp16.distributed import plan_placement


def test_colocated_shares_each_trainer_bundle_with_a_rollout_engine():
    p = plan_placement("colocated", 4, 2, gpus=True, cpus_per_worker=8)
    assert p.bundles == [{"CPU": 8, "GPU": 1.0}] * 4
    assert [(s.rank, s.bundle, s.num_gpus, s.num_cpus) for s in p.role("trainer")] == [(r, r, 0.5, 4) for r in range(4)]
    assert [(s.rank, s.bundle, s.num_gpus) for s in p.role("rollout")] == [(0, 0, 0.5), (1, 1, 0.5)]
    assert p.total == {"CPU": 32, "GPU": 4.0}


def test_split_gives_rollout_engines_their_own_tp_sized_bundles():
    p = plan_placement("split", 8, 2, gpus=True, rollout_tp=4)
    assert p.total["GPU"] == 8 + 2 * 4
    assert [s.bundle for s in p.role("trainer")] == list(range(8))
    assert [(s.bundle, s.num_gpus) for s in p.role("rollout")] == [(8, 4.0), (9, 4.0)]
    assert p.bundles[8] == {"CPU": 1.0, "GPU": 4.0}


def test_cpu_plans_have_no_gpu_resources():
    for layout in ("colocated", "split"):
        p = plan_placement(layout, 2, 1, gpus=False)
        assert "GPU" not in p.total and all(s.num_gpus == 0 for s in p.slots)


@pytest.mark.parametrize("args,match", [
    (("colocated", 1, 2), "rollout engines need as many trainer ranks"),
    (("ring", 2, 1), "layout must be one of"),
    (("split", 0, 1), ">= 1"),
])
def test_impossible_layouts_are_refused_with_the_fix(args, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(*args, gpus=False)


def test_colocated_refuses_multi_gpu_rollout_engines():
    with pytest.raises(ValueError, match="needs layout=split"):
        plan_placement("colocated", 2, 1, gpus=True, rollout_tp=2)


# ---------------------------------------------------------------- node-aware rank assignment (issue 20)
import random  # noqa: E402

from nemo_rl_fp16.distributed.placement import locality_groups, node_local_ranks, split_blocks  # noqa: E402


def _megatron_groups(world: int, tp: int, ep: int, cp: int = 1, pp: int = 1) -> tuple[list, list]:
    """TP and EP groups (lists of ranks) as megatron-core's `initialize_model_parallel` builds them."""
    from megatron.core.parallel_state import RankGenerator

    order = "tp-cp-ep-dp-pp"  # initialize_model_parallel's default, which policy/megatron/parallel.py uses
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * cp * pp), pp=pp, cp=cp, order=order)
    expert = RankGenerator(tp=1, ep=ep, dp=world // (ep * pp), pp=pp, cp=1, order=order)
    return dense.get_ranks("tp"), expert.get_ranks("ep")


def _spans(groups: list, ranks: list[int], nodes: list[str]) -> list[set]:
    """The node set of each group, with `ranks[b]` the rank of bundle b on `nodes[b]`."""
    node_of_rank = {r: nodes[b] for b, r in enumerate(ranks)}
    return [{node_of_rank[r] for r in g} for g in groups]


# where Ray's PACK put the 30B recipe's 16 trainer bundles on a simulated 4 x 8-GPU cluster (issue 20)
ISSUE_LANDING = ["node2"] + ["node3"] * 8 + ["node2"] * 7


def test_moe_30b_tp_and_ep_groups_are_node_local_where_rank_equal_bundle_split_them():
    tp_groups, ep_groups = _megatron_groups(16, tp=2, ep=8)
    assert tp_groups[0] == [0, 1] and ep_groups == [list(range(8)), list(range(8, 16))]  # megatron's order
    identity = list(range(16))
    assert any(len(s) > 1 for s in _spans(ep_groups, identity, ISSUE_LANDING))  # the bug: rank = bundle
    assert any(len(s) > 1 for s in _spans(tp_groups, identity, ISSUE_LANDING))
    ranks = node_local_ranks(ISSUE_LANDING, locality_groups(tp=2, ep=8))
    assert sorted(ranks) == identity
    assert all(len(s) == 1 for s in _spans(tp_groups + ep_groups, ranks, ISSUE_LANDING))


@pytest.mark.parametrize("seed", range(5))
def test_dense_14b_tp4_groups_are_node_local_for_any_landing(seed):
    nodes = ["a"] * 4 + ["b"] * 4
    random.Random(seed).shuffle(nodes)
    tp_groups, _ = _megatron_groups(8, tp=4, ep=1)
    ranks = node_local_ranks(nodes, locality_groups(tp=4))
    assert all(len(s) == 1 for s in _spans(tp_groups, ranks, nodes))


@pytest.mark.parametrize("seed", range(5))
def test_every_block_is_node_local_when_node_counts_are_multiples_of_it(seed):
    rng = random.Random(seed)
    nodes = [n for n, k in zip("abcd", (8, 8, 16, 0), strict=True) for _ in range(k)]
    rng.shuffle(nodes)
    tp_groups, ep_groups = _megatron_groups(32, tp=2, ep=8)
    ranks = node_local_ranks(nodes, locality_groups(tp=2, ep=8))
    assert all(len(s) == 1 for s in _spans(tp_groups + ep_groups, ranks, nodes))


def test_a_block_spans_nodes_only_when_no_node_has_room_for_it():
    nodes = ["small"] * 6 + ["big"] * 10  # EP 8 cannot fit twice: one EP group must span both nodes
    tp_groups, ep_groups = _megatron_groups(16, tp=2, ep=8)
    ranks = node_local_ranks(nodes, locality_groups(tp=2, ep=8))
    assert all(len(s) == 1 for s in _spans(tp_groups, ranks, nodes))
    assert sorted(len(s) for s in _spans(ep_groups, ranks, nodes)) == [1, 2]
    rank_nodes = [nodes[ranks.index(r)] for r in range(16)]
    assert split_blocks(rank_nodes, locality_groups(tp=2, ep=8)) == ["ranks 8-15 (size 8) on 2 nodes"]  # reported


def test_pure_data_parallel_fills_one_node_before_the_next():
    nodes = ["x", "y", "x", "y", "y", "x"]
    ranks = node_local_ranks(nodes, [])
    by_rank = [nodes[ranks.index(r)] for r in range(6)]
    assert by_rank == ["x", "x", "x", "y", "y", "y"]  # ties: the node seen first goes first


def test_block_sizes_follow_megatron_and_keep_only_nested_sizes():
    assert locality_groups(tp=2, ep=8) == [2, 8]
    assert locality_groups(tp=4) == [4]
    assert locality_groups(tp=2, cp=2) == [2, 4]
    assert locality_groups() == []
    nodes = ["a"] * 6 + ["b"] * 6  # TP 2 and EP 3 do not nest: TP (first) is kept, EP 3 dropped
    tp_groups, _ = _megatron_groups(12, tp=2, ep=3)
    ranks = node_local_ranks(nodes, locality_groups(tp=2, ep=3))
    assert all(len(s) == 1 for s in _spans(tp_groups, ranks, nodes))


def test_block_sizes_below_one_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        node_local_ranks(["a"], [0])
