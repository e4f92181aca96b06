"""`get_dataset`: the problems a recipe's `data:` block selects (a registered sanity set or JSONL)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nemo_rl_fp16.data.jsonl import load_jsonl
from nemo_rl_fp16.data.problem import Problem
from nemo_rl_fp16.data.sanity import DATASETS, DEFAULT_NUM_PROBLEMS, make_sanity_dataset


def get_dataset(data_cfg: Mapping[str, Any], seed: int = 0) -> list[Problem]:
    """Problems selected by the recipe's `data` block (`data.dataset` = registered name | jsonl).

    Reads `dataset`, and for `jsonl`: `path`, `prompt_key`, `answer_key`, `template`; for the
    synthetic sets: `num_problems` (optional) and the run `seed`.
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
