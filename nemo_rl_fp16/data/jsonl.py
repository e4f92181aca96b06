"""JSONL math datasets (DeepScaleR-style rows) and the prompt templates applied to them.

Every input error is one line naming the file, the line and the fix, because a bad dataset is
usually discovered at the start of an expensive multi-node job and the message is all the user
sees in the log.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from nemo_rl_fp16.data.problem import Problem

TEMPLATES: dict[str, str] = {
    "plain": "{prompt}",
    # Qwen2.5-Math chat format used by the paper's math runs (sail-sg/Precision-RL)
    "qwen_math": (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "r1_boxed": ("{prompt}\nLet's think step by step and output the final answer within \\boxed{{}}."),
}


class DataError(ValueError):
    """A dataset file or template is unusable; the message says where and how to fix it."""


def resolve_template(template: str) -> str:
    """A `TEMPLATES` name or a `str.format` string using `{prompt}` and any row field.

    Args:
        template: the `data.template` value: a name in `TEMPLATES` ("plain", "qwen_math",
            "r1_boxed") or a format string with named fields.

    Returns:
        The format string to apply to each row.

    Raises:
        DataError: an unknown name (no braces), an invalid format string, or positional fields.
    """
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{" not in template:
        raise DataError(
            f"unknown data.template '{template}'; use one of: {', '.join(sorted(TEMPLATES))}, "
            "or a format string such as '{prompt}'"
        )
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(
            f"data.template {template!r} is not a valid format string ({e}); write literal braces as {{{{ }}}}"
        ) from None
    if any(f == "" or f.isdigit() for f in fields):
        raise DataError(f"data.template {template!r} uses positional fields; name them, e.g. '{{prompt}}'")
    return template


def _keys(row: dict) -> str:
    return ", ".join(repr(k) for k in row) or "none"


def _text(value, path: str, lineno: int, key: str, flag: str) -> str:
    """Strings pass; numbers (e.g. integer answers) become strings; anything else is an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{path}:{lineno}: key '{key}' must be a string, got {type(value).__name__} "
        f"({json.dumps(value)[:40]}); fix the row or pick another key with {flag}=<key>"
    )


def load_jsonl(
    path: str | Path,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    template: str = "{prompt}",
) -> list[Problem]:
    """Read one JSON object per line into `Problem`s with `template` applied to the prompt.

    Blank lines are skipped. Number values (e.g. integer answers) become strings.

    Args:
        path: the JSONL file (UTF-8).
        prompt_key: the row key holding the prompt (`data.prompt_key`).
        answer_key: the row key holding the reference answer (`data.answer_key`).
        template: the `data.template` (see `resolve_template`); `{prompt}` is the prompt text and
            any other field is read from the row.

    Returns:
        One `Problem(prompt=<template applied>, answer=<answer text>)` per non-blank line, in
        file order.

    Raises:
        DataError: one line (file, line, what, fix) on a missing or empty file, non-UTF-8 text,
            invalid JSON, a non-object row, a missing key, a non-text value, a bad template, or a
            template field the row lacks.
    """
    tmpl = resolve_template(template)
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise DataError(f"{p}: {what}; set data.path=<file.jsonl> to an existing JSONL file")
    problems = []
    with p.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(enumerate(f, start=1))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
            ) from None
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}; each line must be one JSON object"
            )
        for key, flag in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
            if key not in row:
                raise DataError(
                    f"{p}:{lineno}: missing key '{key}' (row has keys: {_keys(row)}); set {flag}=<key> to pick another"
                )
        prompt = _text(row[prompt_key], str(p), lineno, prompt_key, "data.prompt_key")
        answer = _text(row[answer_key], str(p), lineno, answer_key, "data.answer_key")
        try:
            text = tmpl.format_map({**row, "prompt": prompt})
        except KeyError as e:
            raise DataError(
                f"{p}:{lineno}: data.template references unknown field {e} (row has keys: {_keys(row)}); "
                "fix data.template or add the field"
            ) from None
        except (IndexError, ValueError, AttributeError, TypeError) as e:
            raise DataError(
                f"{p}:{lineno}: data.template {template!r} cannot be applied ({e}); fix data.template"
            ) from None
        problems.append(Problem(prompt=text, answer=answer))
    if not problems:
        raise DataError(
            f'{p}: no rows (file is empty or blank); put one JSON object per line, e.g. {{"prompt": ..., "answer": ...}}'
        )
    return problems
