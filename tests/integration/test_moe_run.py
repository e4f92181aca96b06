"""An RL run on moe_tiny logs the router flip rate every step, with and without rollout routing replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rl_fp16.config import load_recipe

pytestmark = pytest.mark.integration


def _cfg(tmp_path, *overrides):
    return load_recipe("moe_tiny", [f"output_dir={tmp_path}/run", "trainer.max_steps=2", "logging.progress=false",
                                    "logging.tensorboard=false", "data.prompts_per_step=4", "rollout.max_new_tokens=8",
                                    "trainer.resume=never", *overrides])


@pytest.mark.parametrize("replay", ["none", "rollout", "trainer"])
def test_rl_run_logs_flip_rate_every_step(tmp_path, replay, capsys):
    from rich.console import Console

    from nemo_rl_fp16.commands.rl import run

    cfg = _cfg(tmp_path, "precision=bf16", f"policy.router_replay={replay}", "algorithm.updates_per_rollout=2",
               "policy.micro_batch_size=5")
    console = Console(record=True, width=200)
    run(cfg, console=console)
    rows = [json.loads(x) for x in (Path(tmp_path) / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["mismatch/router_topk_flip_rate"] <= 1.0
        assert {"mismatch/router_topk_flip_rate/layer0", "mismatch/router_topk_flip_rate/layer1"} <= set(r)
    text = console.export_text()
    assert f"router replay {({'rollout': 'rollout (R3)', 'trainer': 'trainer (R2)'}).get(replay, 'none')}" in text
    assert "router_topk_flip_rate logged every step" in text
