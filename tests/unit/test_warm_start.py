"""SFT warm start: makes the sanity task solvable sometimes, and the cache skips retraining."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nemo_rl_fp16 import warm_start
from nemo_rl_fp16.data.sanity import make_sanity_dataset
from nemo_rl_fp16.data.tokenizer import build_char_tokenizer

KW = dict(steps=40, lr=2e-3, batch_size=16, seed=0, progress=False)


@pytest.fixture
def setup():
    tok = build_char_tokenizer()
    problems = make_sanity_dataset("sanity_add", 16, seed=0)

    def model():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(warm_start.tiny_qwen2_config(len(tok)))

    return tok, problems, model


def _count_train(monkeypatch):
    calls = []
    real = warm_start._train

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(warm_start, "_train", counting)
    return calls


def test_warm_start_makes_task_solvable(setup):
    tok, problems, model = setup
    m = model()
    acc = dict(num_samples=4, temperature=1.0, max_new_tokens=4, seed=1)
    assert warm_start.sampled_accuracy(m, tok, problems, **acc) == 0.0
    state = warm_start.warm_start(m, tok, problems, **KW)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert warm_start.sampled_accuracy(m, tok, problems, **acc) > 0.0
    per = warm_start.per_problem_accuracy(m, tok, problems, **acc)
    assert len(per) == len(problems) and all(0.0 <= a <= 1.0 for a in per)


def test_cache_hit_returns_identical_weights_without_training(setup, tmp_path, monkeypatch):
    tok, problems, model = setup
    calls = _count_train(monkeypatch)
    first = warm_start.warm_start(model(), tok, problems, cache_dir=tmp_path, **{**KW, "steps": 5})
    files = list(tmp_path.glob("*/model.safetensors"))
    assert len(calls) == 1 and len(files) == 1 and not list(tmp_path.glob("*/.tmp_*"))
    m2 = model()
    again = warm_start.warm_start(m2, tok, problems, cache_dir=tmp_path, **{**KW, "steps": 5})
    assert len(calls) == 1  # no retraining
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(torch.equal(first[k], v) for k, v in m2.state_dict().items())  # loaded into the model
    # a different setting is a different key
    warm_start.warm_start(model(), tok, problems, cache_dir=tmp_path, **{**KW, "steps": 6})
    assert len(calls) == 2 and len(list(tmp_path.glob("*/model.safetensors"))) == 2


def test_corrupt_cache_warns_and_retrains(setup, tmp_path, monkeypatch):
    tok, problems, model = setup
    calls = _count_train(monkeypatch)
    first = warm_start.warm_start(model(), tok, problems, cache_dir=tmp_path, **{**KW, "steps": 3})
    (path,) = tmp_path.glob("*/model.safetensors")
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = warm_start.warm_start(model(), tok, problems, cache_dir=tmp_path, **{**KW, "steps": 3})
    assert len(calls) == 2
    assert all(torch.equal(first[k], again[k]) for k in first)  # training is deterministic
    assert set(load_file(str(path))) == set(first)  # the cache entry was rewritten
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a bit inside the tensor data: still parses, checksum must catch it
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        warm_start.warm_start(model(), tok, problems, cache_dir=tmp_path, **{**KW, "steps": 3})
    assert len(calls) == 3
