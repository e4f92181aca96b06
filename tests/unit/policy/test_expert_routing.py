"""`ExpertRouting` with fake router taps (no model): which experts each forward replays, per mode.

R3 (`rollout`) replays the rollout's experts in every scoring forward; R2 (`trainer`) routes the
old-logprob pass by the trainer's own gate and replays that pass's experts only in the update
batches `prepare_update` marks; `none` never replays. Refusals name the key and the fix.
The real MoE models: tests/unit/modeling/test_moe_routing.py, tests/unit/policy/megatron/test_routing.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.modeling.moe_routing import replay_targets
from nemo_rl_fp16.policy.expert_routing import REPLAY_SOURCE, ExpertRouting, check_router_replay

VOCAB, N, P, T, LAYERS, K = 16, 4, 3, 5, 2, 2


class FakeTaps:
    """Router taps that only hold the `replay` / `recording` switches `ExpertRouting` sets."""

    def __init__(self):
        self.replay, self.recording = None, False

    def collect(self, which, batch, seq):
        raise AssertionError("not called in these tests")


def _batch():
    b = synthetic_batch(VOCAB, N, P, T)
    experts = torch.arange(N * T * LAYERS * K, dtype=torch.int16).reshape(N, T, LAYERS, K) % 4
    return dataclasses.replace(b, rollout_experts=experts)


def test_refusals_name_the_key_and_the_fix():
    check_router_replay("none")
    with pytest.raises(ValueError, match=r"bad value for 'policy.router_replay': 'r4'; allowed: none, rollout, trainer"):
        check_router_replay("r4")
    with pytest.raises(ValueError, match="this model is dense: set policy.router_replay=none"):
        ExpertRouting(None, "rollout", torch.device("cpu"))
    dense = ExpertRouting(None, "none", torch.device("cpu"))
    assert not dense.is_moe and dense.replay_experts(_batch()) is None
    with pytest.raises(ValueError, match="needs an MoE model"):
        dense.selected_experts(_batch(), False, lambda b: None)


def test_r3_replays_the_rollout_experts_in_every_forward_and_disarms_after():
    taps, batch = FakeTaps(), _batch()
    r = ExpertRouting(taps, "rollout", torch.device("cpu"))
    assert r.is_moe and r.replay_experts(batch) is batch.rollout_experts
    with r.replaying(batch):
        assert torch.equal(taps.replay, replay_targets(batch.rollout_experts, P, P + T))
    assert taps.replay is None
    with pytest.raises(RuntimeError), r.replaying(batch):  # an error in the forward still disarms
        raise RuntimeError("forward failed")
    assert taps.replay is None
    assert r.prepare_update(batch) is batch  # R3 trains on the rollout's experts as they are
    with pytest.raises(ValueError, match="the batch carries no rollout_experts"):
        r.replay_experts(dataclasses.replace(batch, rollout_experts=None))


def test_none_never_replays():
    taps, batch = FakeTaps(), _batch()
    r = ExpertRouting(taps, "none", torch.device("cpu"))
    assert r.replay_experts(batch) is None
    with r.replaying(batch):
        assert taps.replay is None
    assert r.prepare_update(batch) is batch


def test_r2_routes_the_old_logprob_pass_by_its_own_gate_and_replays_its_experts_in_the_update():
    taps, batch = FakeTaps(), _batch()
    r = ExpertRouting(taps, "trainer", torch.device("cpu"))
    assert r.replay_experts(batch) is None  # the old-logprob pass: own routing
    with pytest.raises(ValueError, match="call logprobs\\(batch\\) before train_step\\(batch\\)"):
        r.prepare_update(batch)
    own = torch.zeros(N, T, LAYERS, K, dtype=torch.int16)
    used = torch.ones(N, T, LAYERS, K, dtype=torch.int16)
    r._last = (batch.input_ids.clone(), own, used)  # what a recording logprobs pass leaves
    assert torch.equal(r.recorded(batch)[0], own) and torch.equal(r.recorded(batch)[1], used)
    assert r.selected_experts(batch, False, lambda b: None) is own
    assert r.selected_experts(batch, True, lambda b: None) is used
    upd = r.prepare_update(batch)
    assert upd.extras[REPLAY_SOURCE] == "trainer" and upd.rollout_experts is used
    assert REPLAY_SOURCE not in batch.extras and batch.rollout_experts is not used  # the input is unchanged
    assert r.replay_experts(upd) is used
    other = dataclasses.replace(batch, input_ids=batch.input_ids.flip(0))
    assert r.recorded(other) is None  # another batch's tokens: not this pass's routing
