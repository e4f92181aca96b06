"""docs/metrics.md documents exactly the metric names an RL run writes to metrics.jsonl.

One short run switches on every optional metric group (MoE flip rate, MIS, the KL penalty, held-out
evaluation, fp16 range every step); the names its rows hold are compared with the doc's tables,
where `<lo>-<hi>` stands for a length bucket and `<i>` for a layer index.
"""

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from nemo_rl_fp16.commands.rl import run
from nemo_rl_fp16.config import load_recipe

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDERS = {"<lo>-<hi>": r"\d+-\d+", "<i>": r"\d+"}


def _documented() -> dict[str, re.Pattern]:
    """Each name in the first column of docs/metrics.md's tables, as a full-match pattern."""
    out = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            pattern = re.escape(name)
            for ph, rx in PLACEHOLDERS.items():
                pattern = pattern.replace(re.escape(ph), rx)
            out[name] = re.compile(pattern)
    return out


def test_documented_pattern_parser():
    doc = _documented()
    assert doc["mismatch/kl_by_length/<lo>-<hi>"].fullmatch("mismatch/kl_by_length/0-8")
    assert not doc["mismatch/kl_by_length/<lo>-<hi>"].fullmatch("mismatch/kl_by_length/x")
    assert doc["range/act_absmax/layer<i>"].fullmatch("range/act_absmax/layer1")
    assert doc["eval/pass@k"].fullmatch("eval/pass@k") and "time/step_s" in doc and "reward/mean" in doc


def test_metrics_doc_lists_exactly_the_emitted_names(tmp_path):
    cfg = load_recipe("moe_tiny", [
        f"output_dir={tmp_path}/run", "trainer.max_steps=2", "trainer.eval_every=1", "trainer.eval_k=2",
        "trainer.headroom_every=1", "data.prompts_per_step=2", "data.eval_num_problems=4",
        "rollout.max_new_tokens=8", "mismatch.length_buckets=[4,8]", "algorithm.correction=mis",
        "algorithm.kl_coef=0.01", "logging.progress=false", "logging.tensorboard=false",
    ])
    run(cfg, console=Console(quiet=True))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    emitted = {k for r in rows for k in r} - {"step"}
    doc = _documented()
    undocumented = sorted(k for k in emitted if not any(p.fullmatch(k) for p in doc.values()))
    never_emitted = sorted(name for name, p in doc.items() if not any(p.fullmatch(k) for k in emitted))
    assert not undocumented, f"written to metrics.jsonl but not in docs/metrics.md: {undocumented}"
    assert not never_emitted, f"in docs/metrics.md but not written by the run: {never_emitted}"
