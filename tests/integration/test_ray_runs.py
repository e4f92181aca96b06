"""RL runs on a local Ray cluster: two DP ranks equal one process; split layout with two rollout engines resumes."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from nemo_rl_fp16.commands.rl import run
from nemo_rl_fp16.config import load_recipe

pytestmark = pytest.mark.integration


ray = pytest.importorskip("ray")


QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")  # one warm start for the module's runs


def _cfg(out: Path, ws: Path, *extra: str):
    return load_recipe("sanity_tiny", [f"output_dir={out}", f"warm_start.cache_dir={ws}", "logging.progress=false",
                                       "logging.tensorboard=false", "trainer.save_every=0", *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_colocated_two_rank_data_parallel_run_matches_one_process(tmp_path, ws_cache):
    """2 trainer ranks (FSDP2 over gloo, each on half the rows, with the KL reference policy on the
    same ranks) + 1 rollout engine: the first step is the single-process step (same rollouts, loss,
    KL; grad norm to fp32 rounding)."""
    steps = ["trainer.max_steps=3", "algorithm.kl_coef=0.05"]
    run(_cfg(tmp_path / "one", ws_cache, *steps), console=QUIET)
    run(_cfg(tmp_path / "ray", ws_cache, *steps, "cluster.ray.enabled=true", "cluster.ray.trainer_workers=2",
             "cluster.ray.rollout_workers=1", "cluster.ray.layout=colocated"), console=QUIET)
    one, dist = _rows(tmp_path / "one"), _rows(tmp_path / "ray")
    assert len(dist) == 3 and not ray.is_initialized()  # the run's own Ray is shut down
    for key in ("reward/mean", "mismatch/kl_k3", "loss/value", "response/length_mean"):
        assert dist[0][key] == one[0][key], key
    assert dist[0]["train/grad_norm"] == pytest.approx(one[0]["train/grad_norm"], rel=1e-5)
    assert one[0]["train/grad_norm"] > 0  # the step really trained
    for a, b in zip(one[1:], dist[1:], strict=True):  # later steps: rounding-level weight differences
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=0.05)
        assert b["mismatch/kl_k3"] < 1e-5
        assert b["loss/kl_to_ref"] == pytest.approx(a["loss/kl_to_ref"], rel=1e-2, abs=1e-7)
    assert dist[-1]["loss/kl_to_ref"] > 0  # the policy has moved away from the reference


def test_split_layout_two_rollout_engines_and_resume(tmp_path, ws_cache):
    """Split layout, prompts spread over 2 rollout engines; a checkpoint (full FSDP state) resumes."""
    out = tmp_path / "split"
    ray_args = ["cluster.ray.enabled=true", "cluster.ray.layout=split", "cluster.ray.trainer_workers=2",
                "cluster.ray.rollout_workers=2",
                "trainer.save_every=2"]
    run(_cfg(out, ws_cache, "trainer.max_steps=2", *ray_args), console=QUIET)
    assert (out / "checkpoints" / "step_000002").is_dir()
    run(_cfg(out, ws_cache, "trainer.max_steps=3", *ray_args), console=QUIET)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["reward/mean"] > 0.2 and r["train/grad_norm"] > 0 for r in rows)
    assert rows[2]["mismatch/kl_k3"] < 1e-5
