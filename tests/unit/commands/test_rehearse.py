"""The rehearsal's miniature of a big recipe: the same layout kinds, shrunk, and accepted by the validation stage."""

import pytest

from nemo_rl_fp16.commands.rehearse import miniature, node_sizes, split_options
from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.plan import check_run, make_plan, parallel_layout


def _mini(recipe: str, **kw):
    real = typed(load_recipe(recipe))
    over, notes = miniature(real, **kw)
    return real, typed(load_recipe(recipe, over)), notes


def test_dense_14b_miniature_keeps_megatron_tp_dp_split_layout_and_engines():
    real, mini, notes = _mini("dense_14b_fp16")
    assert (real.policy.tensor_parallel_size, real.policy.sequence_parallel) == (4, True)
    p, ray = mini.policy, mini.cluster.ray
    assert (p.backend, p.tensor_parallel_size, p.expert_parallel_size, p.pipeline_parallel_size) == ("megatron", 2, 1, 1)
    assert p.activation_checkpointing and not p.sequence_parallel
    assert (ray.enabled, ray.layout, ray.trainer_workers, ray.rollout_workers) == (True, "split", 4, 2)
    assert (mini.device, mini.cluster.nodes, mini.cluster.gpus_per_node) == ("cpu", 2, 0)
    assert (mini.rollout.backend, mini.rollout.tensor_parallel_size) == ("torch", 1)
    assert mini.precision.name == real.precision.name == "fp16" and mini.algorithm.name == real.algorithm.name
    assert mini.model.name_or_path is None and mini.model.config["model_type"] == "qwen2"
    assert mini.trainer.max_steps == 2
    check_run(mini)  # the validation stage accepts it (no exception)
    layout = parallel_layout(mini)
    assert (layout.tp, layout.dp, layout.ep) == (2, 2, 1)
    assert "REHEARSAL" in make_plan(mini)["megatron on CPU"]
    text = "\n".join(notes)
    assert "sequence parallel: off (the recipe: on)" in text and "Transformer Engine" in text
    assert "TP 4 x DP 2" in text and "TP 2 x DP 2" in text and "vLLM" in text and "NCCL not exercised" in text


def test_moe_30b_miniature_keeps_ep_groups_spanning_data_parallel_ranks():
    """The recipe's EP 8 over TP 2 puts 4 TP groups (DP ranks with other rows) in one EP group: the miniature
    keeps that kind with TP 2 x DP 4, EP 4 (2 TP groups per EP group), dividing DP and the tiny model's experts."""
    real, mini, notes = _mini("moe_30b_a3b_fp16")
    assert (real.policy.tensor_parallel_size, real.policy.expert_parallel_size) == (2, 8)
    p = mini.policy
    assert (p.tensor_parallel_size, p.expert_parallel_size, p.sequence_parallel) == (2, 4, False)
    assert mini.model.config["model_type"] == "qwen3_moe" and mini.model.config["num_experts"] % 4 == 0
    ray = mini.cluster.ray
    assert (ray.layout, ray.trainer_workers, ray.rollout_workers) == ("split", 8, 2)
    check_run(mini)
    layout = parallel_layout(mini)
    assert (layout.tp, layout.dp, layout.ep) == (2, 4, 4)
    assert "TP 2 x DP 8 (EP 8)" in notes[0] and "TP 2 x DP 4 (EP 4)" in notes[0]
    assert "an EP group covers 2 TP group(s) (DP ranks with their own rows), in the recipe 4" in notes[0]


def test_fewer_trainer_ranks_shrink_dp_and_ep():
    _, mini, notes = _mini("moe_30b_a3b_fp16", trainer_ranks=4, rollout_engines=1)
    check_run(mini)
    layout = parallel_layout(mini)
    assert (layout.tp, layout.dp, layout.ep) == (2, 2, 2) and mini.cluster.ray.rollout_workers == 1
    assert "an EP group covers 1 TP group(s)" in notes[0]


def test_trainer_ranks_that_do_not_hold_tp_are_refused():
    with pytest.raises(ConfigError, match="rehearse.trainer_ranks': 3; allowed: a multiple of the miniature's TP 2"):
        miniature(typed(load_recipe("dense_14b_fp16")), trainer_ranks=3)


def test_options_apart_from_overrides():
    opts, rest = split_options(["rehearse.nodes=3", "seed=4"])
    assert opts == {"nodes": 3, "trainer_ranks": None, "rollout_engines": 2, "steps": 2} and rest == ["seed=4"]
    with pytest.raises(ConfigError, match="unknown key 'rehearse.gpus'; allowed: rehearse.nodes"):
        split_options(["rehearse.gpus=2"])
    with pytest.raises(ConfigError, match="bad value for 'rehearse.steps': '0'; allowed: an integer >= 1"):
        split_options(["rehearse.steps=0"])


def test_simulated_nodes_follow_the_recipes_split_layout():
    """Trainer nodes as the recipe (14B: 8 ranks on one 8-GPU node; 30B: 16 on two), at most one per TP/EP
    block, plus a node for the engines; each trainer node holds whole blocks so no TP/EP group is cut."""
    _, dense, _ = _mini("dense_14b_fp16")
    _, moe, _ = _mini("moe_30b_a3b_fp16")
    assert (dense.cluster.nodes, moe.cluster.nodes) == (2, 3)
    assert node_sizes(4, 2, 2, 2, "split") == [4, 2]  # dense: TP 2 x DP 2 on one node, engines on the other
    assert node_sizes(8, 2, 3, 4, "split") == [4, 4, 2]  # MoE: one EP 4 group per trainer node, DP across nodes
    assert node_sizes(6, 2, 3, 4, "split") == [4, 4, 2]  # rounded up to whole blocks
    assert node_sizes(4, 2, 2, 2, "colocated") == [3, 3]
    _, two, _ = _mini("moe_30b_a3b_fp16", nodes=2)
    assert two.cluster.nodes == 2


def test_overrides_the_miniature_replaces_are_refused_naming_the_option():
    """`trainer.max_steps=7` was silently dropped (the miniature sets 2): refused, pointing at rehearse.steps;
    keys the miniature derives from the recipe (TP, EP, ...) still shape it."""
    from nemo_rl_fp16.commands.rehearse import replaced_overrides

    real = typed(load_recipe("dense_14b_fp16"))
    over, _ = miniature(real)
    with pytest.raises(ConfigError) as e:
        replaced_overrides(["trainer.max_steps=7", "rollout.backend=vllm", "seed=3"], over)
    assert str(e.value).splitlines() == [
        "bad key for 'rehearse': trainer.max_steps; allowed: keys the miniature does not set (use rehearse.steps=N); "
        "remove trainer.max_steps=",
        "bad key for 'rehearse': rollout.backend; allowed: keys the miniature does not set (the rehearsal sets it for "
        "the miniature); remove rollout.backend="]
    replaced_overrides(["policy.tensor_parallel_size=8", "seed=3", "output_dir=/tmp/x"], over)  # no refusal


def test_trainer_ranks_that_lose_expert_parallelism_are_refused():
    """TP 2 x DP 3 cannot hold an EP group dividing DP: the MoE rehearsal would run EP 1 without saying so."""
    real = typed(load_recipe("moe_30b_a3b_fp16"))
    with pytest.raises(ConfigError, match=r"'rehearse.trainer_ranks': 6; allowed: a multiple of 4 .*EP 8"):
        miniature(real, trainer_ranks=6)
    over, _ = miniature(real, trainer_ranks=4)
    assert "policy.expert_parallel_size=2" in over
