"""`get_dataset`: the problems a recipe's `data:` block selects (a registered sanity set or JSONL)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nemo_rl_fp16.data.jsonl import load_jsonl
from nemo_rl_fp16.data.problem import Problem
from nemo_rl_fp16.data.sanity import DATASETS, DEFAULT_NUM_PROBLEMS, make_sanity_dataset


def get_dataset(data_cfg: Mapping[str, Any], seed: int = 0) -> list[Problem]:
    """Problems selected by the recipe's `data` block (`data.dataset` = registered name | jsonl).

    Args:
        data_cfg: the recipe's `data` section. Reads `dataset`; for `jsonl` also `path`,
            `prompt_key` (default "prompt"), `answer_key` (default "answer") and `template`
            (default "{prompt}"); for the synthetic sanity sets `num_problems` (None/0: the set's
            default size).
        seed: the run seed; it fixes the synthetic sets' problems (unused for `jsonl`).

    Returns:
        The problems, in file order for `jsonl`, in generation order for the sanity sets.

    Raises:
        ValueError: `data.dataset=jsonl` without `data.path`, or an unknown `data.dataset`.
        DataError: the JSONL file or template is unusable (from `load_jsonl`; a ValueError).
    """
    name = data_cfg.get("dataset")
    if name == "jsonl":
        path = data_cfg.get("path")
        if not path:
            raise ValueError("data.dataset=jsonl needs data.path=<file.jsonl>")
        return load_jsonl(
            path,
            prompt_key=data_cfg.get("prompt_key") or "prompt",
            answer_key=data_cfg.get("answer_key") or "answer",
            template=data_cfg.get("template") or "{prompt}",
        )
    if name not in DATASETS:
        choices = ", ".join([*sorted(DATASETS), "jsonl"])
        raise ValueError(f"unknown data.dataset '{name}'; choose one of: {choices}")
    return make_sanity_dataset(name, int(data_cfg.get("num_problems") or DEFAULT_NUM_PROBLEMS), seed)
