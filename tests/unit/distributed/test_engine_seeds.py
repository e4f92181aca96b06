"""One sampling seed per rollout engine and step, derived from (seed, step, engine) by `runtime.mix_seed`:
no two engines or steps of a run share a seed (engine i used to take step_seed + i, the seed of engine 0
one step later), also modulo 2**31 (vLLM's range); engine 0 keeps the step seed; the Ray rollout group
hands each engine its own."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from nemo_rl_fp16.distributed.ray_engines import RayRolloutGroup
from nemo_rl_fp16.interfaces import RolloutBatch, SamplingParams
from nemo_rl_fp16.runtime import ENGINE_SEED_STRIDE, engine_seed, mix_seed


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


class _Worker:
    def __init__(self, seeds):
        self.seeds = seeds
        self.call = types.SimpleNamespace(remote=self._generate)

    def _generate(self, method, prompts, params):
        assert method == "generate"
        self.seeds.append(params.seed)
        n = len(prompts)
        ids = torch.ones(n, 3, dtype=torch.long)
        return RolloutBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.ones(n, 1),
                            rollout_logp=torch.zeros(n, 1), prompt_width=2, prompt_index=torch.arange(n))


def test_ray_rollout_group_gives_each_engine_its_seed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda x: x))  # workers answer in-process
    seeds = []
    group = RayRolloutGroup([_Worker(seeds) for _ in range(2)], precision=None, pad_token_id=0, colocated=False)
    for step in range(2):
        params = SamplingParams(num_generations=1, max_new_tokens=1, temperature=1.0, seed=mix_seed(3, step))
        group.generate([[1, 2]] * 4, params)
    assert seeds == [engine_seed(mix_seed(3, s), e) for s in range(2) for e in range(2)]
    assert len(set(seeds)) == 4
