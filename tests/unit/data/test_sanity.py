"""Synthetic perfectible datasets: deterministic per seed, correct, selectable by recipe key."""

import pytest

from nemo_rl_fp16.data import DATASETS, Problem, get_dataset, make_sanity_dataset


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_deterministic_per_seed_and_distinct(name):
    a = make_sanity_dataset(name, 50, seed=3)
    assert a == make_sanity_dataset(name, 50, seed=3)
    assert a != make_sanity_dataset(name, 50, seed=4)
    assert len(set(a)) == 50 and all(isinstance(p, Problem) for p in a)


def test_answers_are_correct():
    for p in make_sanity_dataset("sanity_add", 30, 0):
        a, b = p.prompt.rstrip("=").split("+")
        assert p.answer == str(int(a) + int(b))
    for p in make_sanity_dataset("sanity_reverse", 30, 0):
        assert p.answer == p.prompt.rstrip("=")[::-1]


def test_problem_is_frozen():
    with pytest.raises(AttributeError):
        Problem("1+1=", "2").answer = "3"


def test_get_dataset_registry(tmp_path):
    assert get_dataset({"dataset": "sanity_add", "num_problems": 5}, seed=1) == make_sanity_dataset("sanity_add", 5, 1)
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert get_dataset({"dataset": "jsonl", "path": str(f)}) == [Problem("1+1=", "2")]
    with pytest.raises(ValueError, match="sanity_add.*jsonl"):
        get_dataset({"dataset": "nope"})
    with pytest.raises(ValueError, match="num_problems=0"):
        make_sanity_dataset("sanity_add", 0, 0)
