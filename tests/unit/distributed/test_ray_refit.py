"""`ray_refit.choose_transport`: `rollout.refit_transport` -> the Ray refit's transport.

The transports themselves run under Ray in `tests/integration/test_ray_refit_transports.py`.
"""

import pytest

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.distributed.ray_refit import choose_transport


@pytest.mark.parametrize(("setting", "device", "layout", "want"), [
    ("auto", "cuda", "split", "broadcast"),  # NCCL between rank 0's GPU and the engines' GPUs
    ("auto", "cuda", "colocated", "object_store"),  # ipc is opt-in until its NCCL relay has run on a GPU
    ("ipc", "cuda", "colocated", "ipc"),  # asked for: CUDA IPC handles
    ("auto", "cpu", "split", "object_store"),
    ("auto", "cpu", "colocated", "object_store"),
    ("broadcast", "cpu", "colocated", "broadcast"),  # asked for: done (gloo)
    ("object_store", "cuda", "split", "object_store"),
    ("object_store", "cuda", "colocated", "object_store"),
    ("ipc", "cpu", "colocated", "ipc"),  # asked for: shared-memory handles
    ("ipc", "cuda", "colocated", "ipc"),
])
def test_transport_choice(setting, device, layout, want):
    assert choose_transport(setting, device, layout) == want


def test_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="rollout.refit_transport='nccl': use auto, object_store, broadcast or ipc"):
        choose_transport("nccl", "cuda", "split")


def test_broadcast_on_a_shared_gpu_is_refused():
    with pytest.raises(ValueError, match="layout=colocated on cuda: NCCL cannot .* set rollout.refit_transport=auto"):
        choose_transport("broadcast", "cuda", "colocated")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ipc_on_a_split_layout_is_refused(device):
    with pytest.raises(ValueError, match="refit_transport=ipc with cluster.ray.layout=split: .* set cluster.ray.layout"
                                         "=colocated"):
        choose_transport("ipc", device, "split")


def test_transport_key_without_ray_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"rollout\.refit_transport.*cluster\.ray\.enabled=true"):
        typed(load_recipe("sanity_tiny", ["rollout.refit_transport=broadcast"]))
    rc = typed(load_recipe("sanity_tiny", ["rollout.refit_transport=broadcast", "cluster.ray.enabled=true"]))
    assert rc.rollout.refit_transport == "broadcast"


def test_validation_stage_refuses_broadcast_on_a_shared_gpu():
    """The refusal comes from the layout check (`plan.parallel_layout`, run by `check_run`), before any work."""
    from nemo_rl_fp16.plan import parallel_layout

    rc = typed(load_recipe("sanity_tiny", ["cluster.ray.enabled=true", "device=cuda", "cluster.gpus_per_node=2",
                                           "cluster.ray.trainer_workers=2", "rollout.refit_transport=broadcast"]))
    with pytest.raises(ConfigError, match="rollout.refit_transport=broadcast with cluster.ray.layout=colocated on cuda"):
        parallel_layout(rc)
    split = typed(load_recipe("sanity_tiny", ["cluster.ray.enabled=true", "device=cuda", "cluster.gpus_per_node=4",
                                              "cluster.ray.trainer_workers=2", "cluster.ray.layout=split",
                                              "rollout.refit_transport=broadcast"]))
    parallel_layout(split)  # split: NCCL between distinct GPUs, accepted


def test_validation_stage_refuses_ipc_on_a_split_layout():
    """`ipc` needs each engine on a trainer rank's bundle: a split layout is refused before any work."""
    from nemo_rl_fp16.plan import parallel_layout

    split = typed(load_recipe("sanity_tiny", ["cluster.ray.enabled=true", "cluster.ray.layout=split",
                                              "rollout.refit_transport=ipc"]))
    with pytest.raises(ConfigError, match="rollout.refit_transport=ipc with cluster.ray.layout=split"):
        parallel_layout(split)
    parallel_layout(typed(load_recipe("sanity_tiny", ["cluster.ray.enabled=true", "rollout.refit_transport=ipc"])))
