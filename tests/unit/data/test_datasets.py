"""`get_dataset`: a recipe's `data:` block selects a registered synthetic set or a JSONL file."""

import json

import pytest

from nemo_rl_fp16.data import Problem, get_dataset
from nemo_rl_fp16.data.sanity import DATASETS, DEFAULT_NUM_PROBLEMS


def test_registered_sets_honour_size_and_seed():
    a = get_dataset({"dataset": "sanity_add", "num_problems": 10}, seed=1)
    assert len(a) == 10 and all(isinstance(p, Problem) for p in a)
    assert all(int(p.answer) == sum(map(int, p.prompt.rstrip("=").split("+"))) for p in a)  # really addition
    assert get_dataset({"dataset": "sanity_add", "num_problems": 10}, seed=1) == a  # deterministic
    assert get_dataset({"dataset": "sanity_add", "num_problems": 10}, seed=2) != a  # the run seed matters
    assert len(get_dataset({"dataset": "sanity_reverse"})) == DEFAULT_NUM_PROBLEMS  # num_problems unset / None
    assert len(get_dataset({"dataset": "sanity_add_steps", "num_problems": None})) == DEFAULT_NUM_PROBLEMS
    r = get_dataset({"dataset": "sanity_reverse", "num_problems": 3})
    assert all(p.answer == p.prompt.rstrip("=")[::-1] for p in r), r


def test_jsonl_reads_keys_and_template(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"q": "1+1", "a": "2"}, {"q": "2+3", "a": "5"}]) + "\n")
    got = get_dataset({"dataset": "jsonl", "path": str(path), "prompt_key": "q", "answer_key": "a",
                       "template": "Q: {prompt} A:"}, seed=123)
    assert got == [Problem("Q: 1+1 A:", "2"), Problem("Q: 2+3 A:", "5")]  # file order; the seed plays no part
    plain = tmp_path / "p.jsonl"
    plain.write_text('{"prompt": "x", "answer": "y"}\n')
    # unset keys and template fall back to prompt / answer / "{prompt}"
    assert get_dataset({"dataset": "jsonl", "path": str(plain), "prompt_key": None, "template": None}) == [
        Problem("x", "y")]


def test_errors_name_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"data.dataset=jsonl needs data.path=<file.jsonl>"):
        get_dataset({"dataset": "jsonl", "path": None})
    with pytest.raises(ValueError) as e:
        get_dataset({"dataset": "gsm8k"})
    assert str(e.value) == f"unknown data.dataset 'gsm8k'; choose one of: {', '.join([*sorted(DATASETS), 'jsonl'])}"
    assert "sanity_add_steps" in str(e.value) and str(e.value).endswith("jsonl")
