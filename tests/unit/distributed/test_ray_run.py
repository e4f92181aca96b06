"""The RL loop with trainer ranks and rollout engines as Ray actors on a local CPU Ray cluster."""

import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.distributed.ray_engines import RayRolloutGroup
from nemo_rl_fp16.interfaces import RolloutBatch, SamplingParams
from nemo_rl_fp16.runtime import engine_seed, mix_seed

ray = pytest.importorskip("ray")
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")  # one warm start for the module's runs


def _cfg(out: Path, ws: Path, *extra: str):
    return load_recipe("sanity_tiny", [f"output_dir={out}", f"warm_start.cache_dir={ws}", "logging.progress=false",
                                       "logging.tensorboard=false", "trainer.save_every=0", *extra])


@pytest.mark.parametrize("extra,match", [
    (["cluster.ray.trainer_workers=1", "cluster.ray.rollout_workers=2"], "need as many trainer ranks"),
    (["cluster.ray.layout=ring"], "cluster.ray.layout"),
])
def test_ray_config_errors_before_any_worker_starts(tmp_path, ws_cache, extra, match):
    from nemo_rl_fp16.assembly import build_run

    with pytest.raises(ConfigError, match=match):
        build_run(typed(_cfg(tmp_path, ws_cache, "cluster.ray.enabled=true", *extra)), console=QUIET)
    assert not ray.is_initialized()


# the Ray rollout group hands each engine its own seed (`runtime.engine_seed`; in-process fake workers)
class _SeedWorker:
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
    group = RayRolloutGroup([_SeedWorker(seeds) for _ in range(2)], precision=None, pad_token_id=0, colocated=False)
    for step in range(2):
        params = SamplingParams(num_generations=1, max_new_tokens=1, temperature=1.0, seed=mix_seed(3, step))
        group.generate([[1, 2]] * 4, params)
    assert seeds == [engine_seed(mix_seed(3, s), e) for s in range(2) for e in range(2)]
    assert len(set(seeds)) == 4
