"""`commands/demo.py`: two runs (fp16, bf16) of one recipe, same seed and budget, then one report.

The runs themselves are replaced by a recorder here (a run is minutes: tests/integration/test_rl_loop.py
runs the demo command); what is checked is what `run_demo` asks of them and of the report.
"""

import pytest
from rich.console import Console

from nemo_rl_fp16.commands import demo
from nemo_rl_fp16.config import ConfigError


@pytest.fixture
def recorded(monkeypatch):
    calls = {"runs": [], "report": None}

    def run(cfg, console=None):
        calls["runs"].append(cfg)
        return {"reward/accuracy": 0.5}

    def report(root, runs, numerics, extra):
        calls["report"] = (root, runs, numerics, extra)
        keys = ("kl_k3_pooled", "kl_k3_median_step", "frac_steps_kl_zero", "final_accuracy", "peak_accuracy")
        return {"runs": {p: dict.fromkeys(keys, 0.1) for p in runs}, "kl_k3_pooled_bf16_over_fp16": 3.0,
                "wall_s": extra["wall_s"]}

    monkeypatch.setattr(demo.rl, "run", run)
    monkeypatch.setattr(demo, "write_demo_report", report)
    return calls


def test_fp16_then_bf16_same_seed_own_folders_one_report(tmp_path, recorded):
    root = tmp_path / "demo"
    assert demo.run_demo([f"output_dir={root}", "seed=5"], console=Console(quiet=True)) == 0
    fp16, bf16 = recorded["runs"]
    assert (fp16.precision.name, bf16.precision.name) == ("fp16", "bf16")
    assert fp16.seed == bf16.seed == 5 and fp16.trainer.resume == bf16.trainer.resume == "never"
    assert (fp16.output_dir, bf16.output_dir) == (f"{root}/fp16", f"{root}/bf16")
    rep_root, runs, numerics, extra = recorded["report"]
    assert rep_root == root and {p: str(d) for p, d in runs.items()} == {"fp16": f"{root}/fp16", "bf16": f"{root}/bf16"}
    assert numerics and extra["wall_s"] >= 0


def test_a_bad_override_is_refused_before_either_run(tmp_path, recorded):
    with pytest.raises(ConfigError):
        demo.run_demo([f"output_dir={tmp_path}", "trainer.steps=-1"], console=Console(quiet=True))
    assert recorded["runs"] == [] and recorded["report"] is None
