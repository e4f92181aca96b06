"""The demo report pools KL over the run, shows zero-KL steps and records the numerics."""

import json

import pytest

from nemo_rl_fp16.demo_report import run_summary, write_demo_report


def _rows(kls, n=100, acc=0.5):
    return [{"step": i, "mismatch/kl_k3": k, "mismatch/n_tokens": float(n + i), "reward/accuracy": acc + 0.01 * i,
             "mismatch/seq_logratio_std": 0.1, "mismatch/is_ratio_std": 0.01, "mismatch/is_ratio_max": 1.5,
             "mismatch/mis_masked_frac": 0.0, "response/length_mean": 34.0, "time/step_s": 1.0,
             "mismatch/kl_by_length/1-8": k, "mismatch/tokens_by_length/1-8": float(n + i)}
            for i, k in enumerate(kls)]


def _write(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pooled_kl_is_token_weighted_and_zero_steps_are_counted():
    s = run_summary(_rows([0.0, 2e-6, 0.0, 4e-6]))
    weights = [100, 101, 102, 103]
    assert s["kl_k3_pooled"] == pytest.approx((2e-6 * 101 + 4e-6 * 103) / sum(weights))
    assert s["frac_steps_kl_zero"] == 0.5 and s["kl_k3_median_step"] == pytest.approx(1e-6)
    assert s["kl_by_length_pooled"]["1-8"] == pytest.approx(s["kl_k3_pooled"])
    assert s["final_accuracy"] == pytest.approx(0.515) and s["peak_accuracy"] == pytest.approx(0.53)
    with pytest.raises(ValueError, match="no step"):
        run_summary([])


def test_report_headline_spread_plot_and_numerics(tmp_path):
    _write(tmp_path / "fp16", _rows([1e-8, 2e-8, 0.0]))
    _write(tmp_path / "bf16", _rows([4e-7, 4e-7, 1e-7]))
    out = write_demo_report(tmp_path, {"fp16": tmp_path / "fp16", "bf16": tmp_path / "bf16"},
                            numerics={"isa": "avx2", "kernels": "package"})
    assert out["kl_k3_pooled_bf16_over_fp16"] == pytest.approx(
        out["runs"]["bf16"]["kl_k3_pooled"] / out["runs"]["fp16"]["kl_k3_pooled"])
    spread = out["kl_k3_step_ratio_bf16_over_fp16"]
    assert spread["steps"] == 2 and spread["median"] == pytest.approx(30.0)  # ratios 40 and 20
    md = (tmp_path / "report.md").read_text()
    assert "0.00x" not in md and "isa `avx2`" in md and "frac_steps_kl_zero" in md
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["numerics"]["kernels"] == "package"
