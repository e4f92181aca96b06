"""`Problem`: one prompt and its reference answer, the unit every dataset yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One prompt (already templated, ready to tokenize) and its reference answer."""

    prompt: str
    answer: str
