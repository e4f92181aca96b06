import json
import math

import numpy as np
import pytest
import torch

from nemo_rl_fp16 import report as report_mod
from nemo_rl_fp16.mismatch import mismatch_metrics
from nemo_rl_fp16.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ("report.json", "report.md", "kl_vs_length.png", "logratio_scatter.png",
         "seq_logratio_hist.png")


@pytest.fixture
def fast_plots(monkeypatch):
    """Stub the (slow, ~0.5 s each on CI CPUs) matplotlib renders where plots are not tested."""
    for name in ("_plot_kl_vs_length", "_plot_scatter", "_plot_hist"):
        monkeypatch.setattr(report_mod, name, lambda f, *a: f.write(PNG_MAGIC + b"stub"))


def synthetic_runs(n=48, t=20, seed=0):
    rng = np.random.default_rng(seed)
    rollout = np.log(rng.uniform(0.05, 1.0, size=(n, t)))
    lengths = rng.integers(1, t + 1, size=n)
    mask = np.arange(t)[None, :] < lengths[:, None]
    runs = {}
    for name, noise in (("fp32", 1e-4), ("fp16", 1e-3), ("bf16", 5e-3)):
        train = rollout + noise * rng.standard_normal((n, t))
        runs[name] = {"train_logp": train, "rollout_logp": rollout, "mask": mask}
    runs["bf16"]["train_logp"] = torch.tensor(runs["bf16"]["train_logp"])  # torch works too
    runs["fp16"]["accuracy"] = 0.97
    return runs


def test_report_files_and_numbers(tmp_path):
    runs = synthetic_runs()
    out = write_report(tmp_path / "rep", runs, title="Synthetic mismatch")
    d = tmp_path / "rep"
    for f in FILES:
        assert (d / f).stat().st_size > 0, f
        if f.endswith(".png"):
            assert (d / f).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)  # no temp files left behind
    data = json.loads((d / "report.json").read_text())
    assert data == out
    buckets = tuple(data["length_buckets"])
    assert buckets[-1] == int(max(r["mask"].sum(-1).max() for r in runs.values()))
    for name, run in runs.items():
        entry = data["runs"][name]
        expected = mismatch_metrics(run["train_logp"], run["rollout_logp"], run["mask"],
                                    length_buckets=buckets)
        assert sum("kl_by_length" in k for k in expected) >= 3
        for key, value in expected.items():
            assert entry[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (name, key)
        assert entry["n_sequences"] == 48 and entry["n_tokens"] == int(run["mask"].sum())
    assert data["runs"]["fp16"]["accuracy"] == 0.97
    kl = {p: data["runs"][p]["mismatch/kl_k3"] for p in runs}
    assert kl["fp32"] < kl["fp16"] < kl["bf16"]
    ratio = data["ratios"]["kl_k3_bf16_over_fp16"]
    assert ratio == pytest.approx(kl["bf16"] / kl["fp16"]) and ratio > 10
    assert data["ratios"]["kl_k3_fp32_over_fp16"] == pytest.approx(kl["fp32"] / kl["fp16"])
    md = (d / "report.md").read_text()
    assert "# Synthetic mismatch" in md and f"bf16 vs fp16: **{ratio:.3g}x** fp16's" in md
    fp32 = data["ratios"]["kl_k3_fp32_over_fp16"]
    assert f"fp32 is **{1 / fp32:.3g}x smaller** than fp16" in md and "0.00x" not in md
    assert all(f"({png})" in md for png in FILES[2:])
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 and all(r.count(" | ") == rows[0].count(" | ") for r in rows)


def test_explicit_buckets_no_fp16_and_experts(tmp_path):
    runs = synthetic_runs(n=6, t=5)
    del runs["fp16"]
    experts = np.zeros((6, 5, 2, 2), dtype=np.int64)
    runs["bf16"].update(train_experts=experts, rollout_experts=experts + 1)
    out = write_report(tmp_path, runs, length_buckets=(2, 4))
    assert out["ratios"] == {} and out["length_buckets"] == [2, 4]
    assert out["runs"]["bf16"]["mismatch/router_topk_flip_rate"] == 1.0
    assert "No fp16 run" in (tmp_path / "report.md").read_text()


def test_invalid_runs(tmp_path, fast_plots):
    with pytest.raises(ValueError, match="at least one"):
        write_report(tmp_path, {})
    with pytest.raises(ValueError, match="missing"):
        write_report(tmp_path, {"fp16": {"train_logp": np.zeros((1, 2))}})
    bad = synthetic_runs(n=2, t=3)
    bad["fp32"]["notes"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a scalar"):
        write_report(tmp_path, bad)


def test_crash_midway_leaves_previous_report_intact(tmp_path, monkeypatch, fast_plots):
    write_report(tmp_path, synthetic_runs(n=4, t=4))
    before = {f: (tmp_path / f).read_bytes() for f in FILES}

    def boom(f, data):
        f.write(b"partial")
        raise RuntimeError("plotting crashed")

    monkeypatch.setattr(report_mod, "_plot_hist", boom)
    runs = synthetic_runs(n=4, t=4, seed=1)
    with pytest.raises(RuntimeError, match="plotting crashed"):
        write_report(tmp_path, runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert (tmp_path / "seq_logratio_hist.png").read_bytes() == before["seq_logratio_hist.png"]
    assert (tmp_path / "report.json").read_bytes() == before["report.json"]


def test_zero_fp16_kl_gives_null_ratio(tmp_path, fast_plots):
    x = np.log(np.full((3, 4), 0.5))
    m = np.ones((3, 4), dtype=bool)
    out = write_report(tmp_path, {"fp16": dict(train_logp=x, rollout_logp=x, mask=m),
                                  "bf16": dict(train_logp=x + 0.01, rollout_logp=x, mask=m)})
    assert out["ratios"]["kl_k3_bf16_over_fp16"] is None
    assert math.isfinite(out["runs"]["bf16"]["mismatch/kl_k3"])
    json.loads((tmp_path / "report.json").read_text())  # strict JSON: no NaN/Infinity
