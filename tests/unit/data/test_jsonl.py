"""JSONL loading: templates work and every bad input gives one line naming file, line, fix."""

import pytest

from nemo_rl_fp16.data.jsonl import TEMPLATES, DataError, load_jsonl
from nemo_rl_fp16.data.problem import Problem


def _write(tmp_path, text, name="data.jsonl"):
    f = tmp_path / name
    f.write_text(text)
    return f


def _error(f, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_jsonl(f, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_with_keys_and_templates(tmp_path):
    f = _write(
        tmp_path, '{"problem": "What is 1/2?", "answer": "\\\\frac12", "level": 3}\n\n{"problem": "2+2", "answer": 4}\n'
    )
    rows = load_jsonl(f, prompt_key="problem")
    assert rows == [Problem("What is 1/2?", "\\frac12"), Problem("2+2", "4")]
    qwen = load_jsonl(f, prompt_key="problem", template="qwen_math")
    assert qwen[0].prompt == TEMPLATES["qwen_math"].format(prompt="What is 1/2?")
    assert "\\boxed{}" in qwen[0].prompt and qwen[0].prompt.endswith("<|im_start|>assistant\n")


def test_custom_template_uses_row_fields(tmp_path):
    f = _write(tmp_path, '{"prompt": "x", "answer": "1", "level": 3}\n')
    assert load_jsonl(f, template="[L{level}] {prompt}")[0].prompt == "[L3] x"


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg and "data.path=" in msg


def test_empty_file(tmp_path):
    f = _write(tmp_path, "\n  \n")
    msg = _error(f)
    assert str(f) in msg and "no rows" in msg


def test_invalid_json_names_line(tmp_path):
    f = _write(tmp_path, '{"prompt": "a", "answer": "1"}\n{"prompt": "b", answer: 2}\n')
    msg = _error(f)
    assert f"{f}:2:" in msg and "invalid JSON" in msg


def test_non_object_row(tmp_path):
    f = _write(tmp_path, '["a", "1"]\n')
    assert f"{f}:1:" in _error(f)


def test_missing_key_lists_row_keys_and_flag(tmp_path):
    f = _write(tmp_path, '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "solution": "2"}\n')
    msg = _error(f)
    assert f"{f}:2:" in msg and "missing key 'answer'" in msg
    assert "'prompt', 'solution'" in msg and "data.answer_key=" in msg
    assert "data.prompt_key=" in _error(f, prompt_key="question")


def test_non_string_value(tmp_path):
    f = _write(tmp_path, '{"prompt": "a", "answer": "1"}\n{"prompt": ["b"], "answer": "2"}\n')
    msg = _error(f)
    assert f"{f}:2:" in msg and "'prompt' must be a string, got list" in msg
    f = _write(tmp_path, '{"prompt": "a", "answer": null}\n', "null.jsonl")
    assert "'answer' must be a string, got NoneType" in _error(f)


def test_template_unknown_field(tmp_path):
    f = _write(tmp_path, '{"prompt": "a", "answer": "1"}\n')
    msg = _error(f, template="{prompt} ({topic})")
    assert f"{f}:1:" in msg and "'topic'" in msg and "data.template" in msg


def test_bad_template_names_choices(tmp_path):
    f = _write(tmp_path, '{"prompt": "a", "answer": "1"}\n')
    assert "qwen_math" in _error(f, template="qwen")
    assert "not a valid format string" in _error(f, template="{prompt")
