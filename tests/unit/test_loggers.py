"""`loggers.py`: the JSONL sink (source of truth for reports), its resume cut, TensorBoard, the summary table."""

import json

from rich.console import Console

from nemo_rl_fp16.loggers import MetricsLogger, progress_bar, read_jsonl, summary_table


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_jsonl_rows_are_flat_floats_with_step_and_nonfinite_as_strings(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"reward/mean": 0.5, "train/loss_scale": 65536, "loss/value": float("nan")})
    log.log(2, {"reward/mean": 1.0, "x": float("inf")})
    log.close()
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "reward/mean": 0.5, "train/loss_scale": 65536.0, "loss/value": "nan"},
                    {"step": 2, "reward/mean": 1.0, "x": "inf"}]
    assert isinstance(rows[0]["train/loss_scale"], float)  # strict JSON: no NaN literal in the file
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_resume_cuts_rows_past_the_checkpoint_and_fresh_start_truncates(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log(s, {"m": float(s)})
    log.close()
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    resumed.log(4, {"m": 40.0})
    resumed.close()
    assert [(r["step"], r["m"]) for r in _lines(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                                 (4, 40.0)]
    MetricsLogger(tmp_path, tensorboard=False).close()  # resume_step 0: a new run starts an empty file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_read_jsonl_ignores_a_torn_last_line_and_missing_file(tmp_path):
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "m": 1.0}\n{"step": 2, "m": 2.0}\n{"step": 3, "m"')
    assert read_jsonl(p) == [{"step": 1, "m": 1.0}, {"step": 2, "m": 2.0}]
    log = MetricsLogger(tmp_path, tensorboard=False, resume_step=2)  # the torn row is dropped on resume
    log.close()
    assert _lines(p) == [{"step": 1, "m": 1.0}, {"step": 2, "m": 2.0}]


def test_jsonl_off_writes_no_file_and_tensorboard_writes_events(tmp_path):
    log = MetricsLogger(tmp_path, jsonl=False, tensorboard=True)
    log.log(1, {"reward/mean": 0.25})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.25)]


def test_summary_table_and_progress_bar():
    console = Console(record=True, width=80)
    console.print(summary_table("done", [("reward/accuracy", "0.9"), ("train/loss_scale", "65536")]))
    text = console.export_text()
    assert "done" in text and "reward/accuracy" in text and "65536" in text
    bar = progress_bar(False, Console(quiet=True))
    assert bar.disable
    with bar:
        task = bar.add_task("x", total=3, metrics="")
        bar.update(task, advance=2, metrics="acc 0.5")
    assert bar.tasks[0].completed == 2 and bar.tasks[0].fields["metrics"] == "acc 0.5"
