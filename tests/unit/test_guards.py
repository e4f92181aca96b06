"""`guards.py` functions on their own: which tensors are flagged, which updates stop a run, reward checks.

The guards inside a run (a diverged policy, a NaN reward, refused refit/checkpoint/export) are in
tests/unit/test_errors.py and tests/integration/test_errors_cli.py.
"""

import math

import pytest
import torch

from nemo_rl_fp16.guards import NonFiniteError, check_reward, check_update, check_weights, nonfinite_tensors


def test_nonfinite_tensors_names_offenders_in_order_and_skips_non_float():
    state = {
        "a": torch.ones(3),
        "b": torch.tensor([1.0, float("nan")]),
        "ids": torch.tensor([1, 2]),  # integer: skipped
        "empty": torch.empty(0),  # nothing to check
        "c": torch.tensor([float("-inf")], dtype=torch.float16),
        "note": "not a tensor",
    }
    assert nonfinite_tensors(state) == ["b", "c"]
    assert nonfinite_tensors({}) == [] and nonfinite_tensors({"ids": torch.tensor([7])}) == []


def test_nonfinite_tensors_max_abs_flags_values_beyond_the_range():
    state = {"ok": torch.tensor([65504.0]), "big": torch.tensor([-70000.0]), "fine": torch.tensor([1.0])}
    assert nonfinite_tensors(state) == []
    assert nonfinite_tensors(state, max_abs=65504.0) == ["big"]


def test_check_weights_fp16_range_only_when_a_dtype_is_given():
    state = {"w": torch.tensor([1e5])}  # finite in fp32, inf once cast to fp16
    check_weights(state, "refit", 2)
    check_weights(state, "refit", 2, dtype=torch.float32)
    with pytest.raises(NonFiniteError, match=r"refit refused at step 2: 1 weight tensor\(s\) are non-finite "
                                             r"\(or beyond torch.float16 range\), e\.g\. w"):
        check_weights(state, "refit", 2, dtype=torch.float16)


def test_check_reward_passes_finite_and_names_the_sample_otherwise():
    assert check_reward(1, "exact_match", 0, 0, "2") == 1.0 and isinstance(check_reward(1, "m", 0, 0, ""), float)
    long = "x" * 200
    with pytest.raises(NonFiniteError) as e:
        check_reward(float("inf"), "math_verify", 9, 4, long)
    msg = str(e.value)
    assert "reward 'math_verify' returned inf for sample 9 (prompt 4" in msg
    assert "x" * 77 + "..." in msg and "x" * 78 not in msg  # long responses are cut at 80 characters
    assert len(msg.splitlines()) == 1


KW = dict(retries=0, max_retries=2, step=5)


def test_check_update_lets_finite_updates_and_handled_overflows_pass():
    check_update(False, 0.3, 1.2, loss_scaling=True, **KW)
    check_update(False, 0.3, 1.2, loss_scaling=False, **KW)
    check_update(True, 0.3, math.inf, loss_scaling=True, **KW)  # fp16 overflow: the scaler backs off, retried
    check_update(True, math.nan, math.nan, loss_scaling=True, retries=1, max_retries=2, step=5)


@pytest.mark.parametrize("skipped,loss,gn,scaling,retries,match", [
    (True, 0.3, math.inf, False, 0, r"step 5: non-finite loss 0.3, grad norm inf without loss scaling"),
    (False, math.nan, 1.0, False, 0, r"step 5: non-finite loss nan, grad norm 1 without loss scaling"),
    (True, 0.3, math.inf, True, 2, r"step 5: fp16 overflow persisted over 3 attempts"),
    (False, math.inf, 1.0, True, 0, r"step 5: non-finite loss inf, grad norm 1; the run stops"),
])
def test_check_update_stops_what_no_scaler_fixes(skipped, loss, gn, scaling, retries, match):
    with pytest.raises(NonFiniteError, match=match) as e:
        check_update(skipped, loss, gn, loss_scaling=scaling, retries=retries, max_retries=2, step=5)
    assert len(str(e.value).splitlines()) == 1
