"""Rule-based rewards: exact match for the sanity tasks, math-verify for real math sets."""

from __future__ import annotations

import threading
from collections.abc import Callable

Reward = Callable[[str, str], float]


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response equals the answer up to surrounding whitespace, else 0.0.

    Args:
        response: the decoded response text.
        answer: the reference answer.

    Returns:
        The reward, 1.0 or 0.0.
    """
    return 1.0 if response.strip() == answer.strip() else 0.0


def last_boxed(text: str) -> str | None:
    r"""Contents of the last `\boxed{...}` (or `\fbox{...}`) with balanced braces.

    Args:
        text: a response or reference answer.

    Returns:
        The text between the braces (nested braces kept), or None when there is no boxed
        expression or its braces never close.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _math_verify():
    try:
        from math_verify import parse, verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reward.name=math_verify needs the 'math-verify' package ({e}); "
            "install it with `pip install 'math-verify[antlr4_13_2]'` or use reward.name=exact_match"
        ) from e
    return parse, verify


def math_verify_reward(response: str, answer: str) -> float:
    r"""1.0 when the last `\boxed{}` in the response is mathematically equal to `answer`.

    Uses HuggingFace math-verify (`parse`, `verify`). No boxed answer scores 0.0 (the prompt
    templates ask for one). math-verify guards parsing with SIGALRM timeouts (5 s here), which
    raise off the main thread; there they are disabled (inputs are short boxed expressions)
    instead of silently scoring everything 0. Any parse or comparison failure scores 0.0 rather
    than crashing a training step.

    Args:
        response: the decoded response text.
        answer: the reference answer, boxed or bare.

    Returns:
        The reward, 1.0 or 0.0.

    Raises:
        ImportError: the `math-verify` package is not installed (the message gives the pip command).
    """
    parse, verify = _math_verify()
    pred = last_boxed(response)
    if pred is None or not pred.strip():
        return 0.0
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_expr = last_boxed(answer)
        gold = parse(f"\\boxed{{{gold_expr if gold_expr is not None else answer}}}", parsing_timeout=timeout)
        target = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if not gold or not target:
            return 0.0
        return 1.0 if verify(gold, target, timeout_seconds=timeout) else 0.0
    except Exception:
        return 0.0


REWARDS: dict[str, Reward] = {"exact_match": exact_match, "math_verify": math_verify_reward}


def get_reward(name: str) -> Reward:
    """The reward function registered as `name` (recipe key `reward.name`).

    Args:
        name: "exact_match" or "math_verify".

    Returns:
        A callable `(response, answer) -> float` (1.0 or 0.0).

    Raises:
        ValueError: an unknown name; the message lists the registered ones.
    """
    if name not in REWARDS:
        raise ValueError(f"unknown reward.name '{name}'; choose one of: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]
