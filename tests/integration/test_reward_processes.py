"""Rewards scored in a process pool (`reward.workers`): the serial values, in order; a dead worker
is a clear error, not a hang."""

from __future__ import annotations

import os
import signal

import pytest

from nemo_rl_fp16.data.reward_pool import RewardPoolError, RewardScorer
from nemo_rl_fp16.data.rewards import REWARDS

pytestmark = pytest.mark.integration

RESPONSES = [f"so the answer is \\boxed{{{v}}}" for v in ("4", "\\frac{1}{2}", "0.5", "x+1", "1+x", "7", "", "2^3")]
ANSWERS = ["4", "0.5", "\\frac12", "1+x", "x+2", "8", "1", "8"]


@pytest.mark.parametrize("name", ["exact_match", "math_verify"])
def test_pool_equals_serial_in_order(name):
    if name == "math_verify":
        pytest.importorskip("math_verify")
    responses, answers = RESPONSES * 3, ANSWERS * 3  # 24 samples over 3 workers: 3 chunks of 8
    serial = [REWARDS[name](r, a) for r, a in zip(responses, answers, strict=True)]
    scorer = RewardScorer(name, REWARDS[name], workers=3)
    try:
        assert scorer.workers == 3
        assert scorer(responses, answers) == serial
        assert scorer._pool is not None  # it did run in the pool
        assert scorer(responses[::-1], answers[::-1]) == serial[::-1]  # the pool is reused, order kept
    finally:
        scorer.close()
    if name == "math_verify":
        assert sum(serial) >= 4, serial  # the cases include real equivalences (1/2 = 0.5, x+1 = 1+x)


def test_dead_worker_is_an_error_not_a_hang():
    scorer = RewardScorer("exact_match", REWARDS["exact_match"], workers=2)
    try:
        assert scorer(["a", "b"], ["a", "c"]) == [1.0, 0.0]
        for pid in list(scorer._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(RewardPoolError, match=r"reward.workers=2: a reward worker process died .*reward.workers=0"):
            for _ in range(50):  # the pool notices the dead worker within a call or two
                scorer(["a", "b"], ["a", "c"])
        assert scorer._pool is None
        assert scorer(["a", "b"], ["a", "c"]) == [1.0, 0.0]  # a later call starts a new pool
    finally:
        scorer.close()
