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
