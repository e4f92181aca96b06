"""`commands/rl.py` pieces that run before the loop: the startup precision audit and the MoE log line.

The whole command (a recipe end to end): tests/integration/test_rl_loop.py.
"""

from types import SimpleNamespace

import pytest

from nemo_rl_fp16.commands.rl import audit, moe_line
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.precision import PrecisionMismatchError


class Engine:
    def __init__(self, problems):
        self.problems = problems

    def audit(self):
        return list(self.problems)


def _rc(recipe, *over):
    return typed(load_recipe(recipe, ["output_dir=/tmp/unused", *over]))


def test_audit_refuses_the_first_engine_with_a_finding():
    rc = _rc("sanity_tiny")
    audit(SimpleNamespace(policy=Engine([]), rollout=Engine([])), rc)  # clean: no error
    with pytest.raises(PrecisionMismatchError) as e:
        audit(SimpleNamespace(policy=Engine([]), rollout=Engine(["lm_head.weight: bfloat16, policy float16"])), rc)
    assert e.value.problems == ["lm_head.weight: bfloat16, policy float16"] and "rollout engine" in str(e.value)
    with pytest.raises(PrecisionMismatchError, match="trainer"):
        audit(SimpleNamespace(policy=Engine(["x: float32, policy float16"]), rollout=Engine(["y"])), rc)


def test_audit_refuses_an_undeclared_ablation_before_asking_the_engines():
    rc = _rc("sanity_tiny", "precision=fp16", "precision.rollout=bf16")
    with pytest.raises(PrecisionMismatchError):
        audit(SimpleNamespace(policy=Engine([]), rollout=Engine([])), rc)


def test_moe_line_says_which_replay_and_whether_flips_are_measured():
    assert moe_line(_rc("sanity_tiny")) is None  # dense
    line = moe_line(_rc("moe_tiny"))
    assert line.startswith("MoE routing: router replay none;") and "router_topk_flip_rate logged every step" in line
    assert "rollout (R3)" in moe_line(_rc("moe_tiny", "policy.router_replay=rollout"))
    assert "trainer (R2)" in moe_line(_rc("moe_tiny", "policy.router_replay=trainer"))
