"""Rewards: exact match and math-verify equivalence, robust to junk and to worker threads."""

import threading

import pytest

from nemo_rl_fp16.data.rewards import REWARDS, exact_match, get_reward, last_boxed, math_verify_reward


def test_exact_match():
    assert exact_match(" 82\n", "82") == 1.0
    assert exact_match("820", "82") == 0.0
    assert exact_match("", "82") == 0.0


def test_last_boxed_balanced():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{1/2}", "\\dfrac12", 1.0),
        ("first \\boxed{3} then \\boxed{4}", "4", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("4", "4", 0.0),  # no boxed answer: the template asks for one
        ("\\boxed{}", "4", 0.0),
        ("\\boxed{\\frac{", "4", 0.0),
        ("\\boxed{)(*&^}", "1", 0.0),
    ],
)
def test_math_verify(response, answer, expected):
    assert math_verify_reward(response, answer) == expected


def test_math_verify_off_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_verify_reward("\\boxed{\\frac{2}{4}}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


def test_registry():
    assert get_reward("exact_match") is exact_match and set(REWARDS) == {"exact_match", "math_verify"}
    with pytest.raises(ValueError, match="exact_match, math_verify"):
        get_reward("f1")
