"""The RL loop with trainer ranks and rollout engines as Ray actors on a local CPU Ray cluster."""

from pathlib import Path

import pytest
from rich.console import Console

from nemo_rl_fp16.config import ConfigError, load_recipe, typed

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
