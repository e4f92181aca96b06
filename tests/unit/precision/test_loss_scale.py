"""Dynamic loss scaler (`precision/loss_scale.py`): trajectories, hysteresis, retries at a lower scale."""

import pytest
import torch

from nemo_rl_fp16.precision import DynamicLossScaler


def _run(scaler, seq):
    out = []
    for inf in seq:
        scaler.update(inf)
        out.append(scaler.scale)
    return out


def test_scaler_hysteresis_then_backoff():
    s = DynamicLossScaler(initial_scale=1024, min_scale=1, growth_interval=3, hysteresis=2)
    # first overflow only uses up hysteresis, the second halves, later ones keep halving
    # (megatron does not refill hysteresis until the scale grows)
    assert _run(s, [True, True, True, False, False, False]) == [1024, 512, 256, 256, 256, 512]


def test_scaler_growth_refills_hysteresis():
    s = DynamicLossScaler(initial_scale=8, growth_interval=2, hysteresis=2)
    assert _run(s, [False, False, True, False, True, True]) == [8, 16, 16, 16, 8, 4]


def test_scaler_min_scale_floor_and_growth_tracker_reset():
    s = DynamicLossScaler(initial_scale=4, min_scale=2, growth_interval=3, hysteresis=1)
    assert _run(s, [True, True, True]) == [2, 2, 2]
    # overflow resets the growth tracker: two clean, one inf, two clean -> no growth yet
    assert _run(s, [False, False, True, False, False, False]) == [2, 2, 2, 2, 2, 4]


def test_scaler_tensor_found_inf_and_state_round_trip():
    a = DynamicLossScaler(initial_scale=256, growth_interval=4, hysteresis=3)
    _run(a, [False, torch.tensor(True), False])
    b = DynamicLossScaler(initial_scale=1, growth_interval=4, hysteresis=3)
    b.load_state_dict(a.state_dict())
    seq = [True, True, False, False, False, False, True]
    assert _run(a, seq) == _run(b, seq)


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_retry_after_overflow_runs_at_a_strictly_lower_scale(hysteresis):
    """The loop retries an overflowed update on the same batch: whatever the hysteresis, the retry's
    scale is below the overflowed attempt's (hysteresis 2 used to retry at the same scale)."""
    s = DynamicLossScaler(initial_scale=1024, min_scale=1, hysteresis=hysteresis)
    used = s.scale
    s.update(True)
    assert s.scale == (512 if hysteresis == 1 else 1024)  # megatron semantics of update() unchanged
    assert s.back_off_below(used) and s.scale == 512
    used = s.scale  # the retry overflows too: the next one is lower again, and hysteresis is spent
    s.update(True)
    assert s.scale == 256 and s.back_off_below(used) and s.scale == 256


def test_retry_backoff_stops_at_min_scale():
    s = DynamicLossScaler(initial_scale=4, min_scale=2, hysteresis=2)
    s.update(True)
    assert s.back_off_below(4.0) and s.scale == 2
    s.update(True)
    assert not s.back_off_below(2.0) and s.scale == 2  # cannot go lower: the loop skips instead


def test_scaler_rejects_bad_settings():
    with pytest.raises(ValueError):
        DynamicLossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError):
        DynamicLossScaler(initial_scale=1, min_scale=2)
