"""`runtime.py`: the one seed mixer, process-wide seeding, the temporary torch thread count."""

import random

import numpy as np
import pytest
import torch

from nemo_rl_fp16.runtime import (
    ENGINE_SEED_STRIDE,
    SEED_MULTIPLIER,
    engine_seed,
    mix_seed,
    seed_everything,
    torch_threads,
)


def test_mix_seed_is_the_documented_formula():
    assert mix_seed(0, 0) == 0 and mix_seed(0, 7) == 7
    assert mix_seed(3, 5) == 3 * 1_000_003 + 5 and SEED_MULTIPLIER == 1_000_003
    big = 2**62
    assert mix_seed(big, 11) == (big * 1_000_003 + 11) % (2**63 - 1)
    assert mix_seed(12345, 9, modulus=2**31) == (12345 * 1_000_003 + 9) % 2**31 < 2**31  # vLLM's seed range


def test_mix_seed_streams_never_repeat_within_the_stated_range():
    """(seed, k) pairs for k < 1_000_003 map to distinct seeds: steps, requests and engines never share a stream."""
    seen = {mix_seed(s, k) for s in range(4) for k in (0, 1, 2, 999, 1_000_002)}
    assert len(seen) == 4 * 5
    assert mix_seed(1, 0) != mix_seed(0, 1) and mix_seed(0, 1_000_003) == mix_seed(1, 0)  # the range is the bound


def test_seed_everything_reseeds_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(123)
    a = draw()
    seed_everything(123)
    assert draw() == a
    seed_everything(124)
    b = draw()
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_seed_everything_accepts_seeds_beyond_numpy_range():
    seed_everything(2**40 + 5)  # numpy's legacy RNG takes < 2**32: reduced, not an error
    x = float(np.random.rand())
    seed_everything(5)
    assert float(np.random.rand()) == x  # 2**40 + 5 and 5 agree modulo 2**32 for numpy


def test_torch_threads_sets_then_restores():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), torch_threads(target):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before  # restored after an error too
    with torch_threads(None):
        assert torch.get_num_threads() == before


# one sampling seed per rollout engine and step (issue 20): no two engines or steps share one, also
# modulo 2**31 (vLLM's range); engine 0 keeps the step seed
@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**40 + 3])
def test_engines_and_steps_never_share_a_seed(seed):
    seen, seen31 = {}, set()
    for step in range(200):
        for engine in range(8):
            s = engine_seed(mix_seed(seed, step), engine)  # the trainer's step seed, then the engine's
            assert s == mix_seed(seed, step + engine * ENGINE_SEED_STRIDE)
            assert s not in seen and s % 2**31 not in seen31, (seed, (step, engine), seen.get(s))
            seen[s] = (step, engine)
            seen31.add(s % 2**31)
    assert engine_seed(mix_seed(seed, 5), 0) == mix_seed(seed, 5)
    # the old rule collided: engine 1 at step 0 == engine 0 at step 1
    assert mix_seed(seed, 0) + 1 == mix_seed(seed, 1)
