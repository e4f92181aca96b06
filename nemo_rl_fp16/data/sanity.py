"""Perfectible sanity tasks and the dataset registry.

The paper's "perfectible" set keeps only problems the initial policy solves with non-zero
probability, so a correct RL algorithm should drive training accuracy to ~100% and any plateau
or collapse is the algorithm's (or the precision's) fault. These synthetic tasks give the same
property on CPU: a tiny Qwen2 warm-started by SFT (`nemo_rl_fp16.warm_start`) solves them sometimes, and RL
only has to sharpen what the model already knows.

Every generator is deterministic given `(num_problems, seed)` and draws without replacement.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nemo_rl_fp16.data.problem import Problem


def _sample_unique(rng: random.Random, n: int, space: int, name: str) -> list[int]:
    if n < 1 or n > space:
        raise ValueError(f"{name}: num_problems={n} must be in [1, {space}] (distinct problems available)")
    return rng.sample(range(space), n)


def make_add(num_problems: int, seed: int) -> list[Problem]:
    """Two-digit addition, `"37+45="` -> `"82"` (8100 distinct problems).

    Args:
        num_problems: problems to draw, without replacement.
        seed: seeds the draw (same seed, same problems).

    Returns:
        `num_problems` problems (prompt, answer).

    Raises:
        ValueError: `num_problems` is not in [1, 8100].
    """
    rng = random.Random(f"sanity_add:{seed}")
    out = []
    for k in _sample_unique(rng, num_problems, 90 * 90, "sanity_add"):
        a, b = 10 + k // 90, 10 + k % 90
        out.append(Problem(prompt=f"{a}+{b}=", answer=str(a + b)))
    return out


def make_reverse(num_problems: int, seed: int) -> list[Problem]:
    """Reverse a 4-digit string, `"1234="` -> `"4321"` (10000 distinct problems).

    Args:
        num_problems: problems to draw, without replacement.
        seed: seeds the draw (same seed, same problems).

    Returns:
        `num_problems` problems (prompt, answer).

    Raises:
        ValueError: `num_problems` is not in [1, 10000].
    """
    rng = random.Random(f"sanity_reverse:{seed}")
    out = []
    for k in _sample_unique(rng, num_problems, 10_000, "sanity_reverse"):
        s = f"{k:04d}"
        out.append(Problem(prompt=f"{s}=", answer=s[::-1]))
    return out


def addition_steps(a: int, b: int) -> str:
    """Column addition written out right to left, then the sum.

    Example: `addition_steps(4738, 2595)` -> `"8+5=13 3+9+1=13 7+5+1=13 4+2+1=7 7333"` (each
    column `x+y[+carry]=s`).

    Args:
        a: first addend (non-negative).
        b: second addend (non-negative).

    Returns:
        The written-out computation, the reference answer of an `add_steps` problem.
    """
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        carry = s // 10
    return " ".join(steps) + f" {a + b}"


def make_add_steps(num_problems: int, seed: int) -> list[Problem]:
    """Four-digit addition written out column by column (the `add_steps` task).

    `"4738+2595="` -> `"8+5=13 3+9+1=13 7+5+1=13 4+2+1=7 7333"` (81M distinct problems; responses
    of 33-41 characters, mean ~37: long enough for the rounding mismatch to accumulate, arXiv
    2510.26788 Fig. 2). The reward is exact match on the whole written-out computation.

    Args:
        num_problems: problems to draw.
        seed: seeds the draw (same seed, same problems).

    Returns:
        `num_problems` problems (prompt, answer).
    """
    rng = random.Random(f"sanity_add_steps:{seed}")
    out = []
    for k in _sample_unique(rng, num_problems, 9000 * 9000, "sanity_add_steps"):
        a, b = 1000 + k // 9000, 1000 + k % 9000
        out.append(Problem(prompt=f"{a}+{b}=", answer=addition_steps(a, b)))
    return out


# name -> generator(num_problems, seed); `jsonl` is handled by `get_dataset` (it reads a file)
DATASETS: dict[str, Callable[[int, int], list[Problem]]] = {
    "sanity_add": make_add,
    "sanity_reverse": make_reverse,
    "sanity_add_steps": make_add_steps,
}
DEFAULT_NUM_PROBLEMS = 64


def make_sanity_dataset(name: str, num_problems: int = DEFAULT_NUM_PROBLEMS, seed: int = 0) -> list[Problem]:
    """Build the registered synthetic dataset `name`.

    Args:
        name: a `DATASETS` key: "sanity_add", "sanity_reverse" or "sanity_add_steps".
        num_problems: problems to draw (default 64).
        seed: seeds the draw.

    Returns:
        `num_problems` distinct problems, deterministic given `(num_problems, seed)`.

    Raises:
        ValueError: an unknown name (the message lists the choices), or `num_problems` outside
            [1, distinct problems of the task].
    """
    if name not in DATASETS:
        raise ValueError(f"unknown sanity dataset '{name}'; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](num_problems, seed)
