"""An RL run with held-out evaluation logs the eval metrics and shows them in the summary."""

import json

import pytest
from rich.console import Console

from nemo_rl_fp16.config import load_recipe

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("every", [2])
def test_run_logs_eval_metrics_and_summary(tmp_path, every):
    from nemo_rl_fp16.commands.rl import run

    cfg = load_recipe("sanity_tiny", [f"output_dir={tmp_path}/run", "warm_start.enabled=false", "trainer.max_steps=3",
                                      f"trainer.eval_every={every}", "trainer.eval_k=2", "data.eval_num_problems=6",
                                      "data.prompts_per_step=4", "rollout.num_generations=2", "trainer.save_every=0",
                                      "logging.progress=false", "logging.tensorboard=false"])
    console = Console(record=True, width=200)
    final = run(cfg, console=console)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in rows if "eval/pass@k" in r]
    assert evaluated == [2, 3]  # every 2 steps and at the end
    assert {"eval/accuracy_greedy", "eval/pass@k", "eval/mean@k"} <= final.keys() and final["eval/num_problems"] == 6
    text = console.export_text()
    assert "eval/pass@k" in text  # end-of-run summary
    assert "param_dtype       float16   float16" in text  # the start-of-run trainer-vs-rollout dtype table
