"""`reward.workers`: how many processes score a step's rewards, and the in-process path.
(The pool itself runs worker processes: tests/integration/test_reward_processes.py.)"""

from __future__ import annotations

import os

import pytest

from nemo_rl_fp16.data.reward_pool import RewardScorer, resolve_workers
from nemo_rl_fp16.data.rewards import REWARDS


def test_worker_count_resolution():
    assert resolve_workers("math_verify", None) == (n if (n := min(8, os.cpu_count() or 1)) >= 2 else 0)
    assert resolve_workers("exact_match", None) == 0  # a string compare: cheaper than a round trip to a worker
    assert resolve_workers("exact_match", 3) == 3  # an explicit count is honoured for every reward
    assert resolve_workers("math_verify", 1) == 0 and resolve_workers("math_verify", 0) == 0


def test_in_process_path_scores_in_order():
    scorer = RewardScorer("exact_match", REWARDS["exact_match"], workers=0)
    assert scorer.workers == 0
    assert scorer(["4", " 5 ", "x"], ["4", "5", "y"]) == [1.0, 1.0, 0.0]
    assert scorer._pool is None  # no process started


def test_unregistered_function_stays_in_process():
    """A pool can only run registered rewards (looked up by name in the worker): anything else is scored here."""
    scorer = RewardScorer("exact_match", lambda r, a: float(len(r)), workers=4)
    assert scorer.workers == 0 and scorer(["ab", "c"], ["", ""]) == [2.0, 1.0]


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        RewardScorer("exact_match", REWARDS["exact_match"])(["a", "b"], ["a"])
