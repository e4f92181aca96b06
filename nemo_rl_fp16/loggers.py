"""Metric sinks (JSONL, TensorBoard, W&B / MLflow when installed) and the console view.

One `MetricsLogger.log(step, metrics)` call fans out to every enabled sink. The JSONL file is
the source of truth for reports; on resume it is cut back to the resumed step so that a killed
and resumed run leaves the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (a torn last line from a crash is ignored).

    Reading stops at the first line that is not valid JSON.

    Args:
        path: the metrics.jsonl file; a missing file gives no rows.

    Returns:
        One dict per line, {"step": int, name: float | "nan" | "inf" | "-inf"} as `log` wrote it.
    """
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class MetricsLogger:
    """Writes each step's flat `{name: float}` metrics to the enabled sinks.

    Args:
        out_dir: the run folder (created if missing): `metrics.jsonl` and `tensorboard/` go here.
        jsonl: write `<out_dir>/metrics.jsonl`; rows with step > `resume_step` are dropped first
            (all rows when `resume_step` is 0), so a resumed run's file equals an uninterrupted one.
        tensorboard: write TensorBoard events (events past `resume_step` are purged).
        wandb: the `logging.wandb` section; with `enabled` true a wandb run is started in
            `project` (ImportError when wandb is not installed).
        mlflow: the `logging.mlflow` section; with `enabled` true an mlflow run is started in the
            experiment `project` (ImportError when mlflow is not installed).
        run_name: the wandb / mlflow run name.
        config: the resolved recipe, logged as the wandb run's config.
        resume_step: the step the run resumes from (0: a fresh run).
    """

    def __init__(self, out_dir: str | os.PathLike, *, jsonl: bool = True, tensorboard: bool = True,
                 wandb: Mapping | None = None, mlflow: Mapping | None = None, run_name: str = "run",
                 config: Mapping | None = None, resume_step: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = None
        if jsonl:
            path = self.out_dir / "metrics.jsonl"
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step] if resume_step else []
            with open(path, "w") as f:  # rewrite: drop rows past the checkpoint we resume from
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self._jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # drop events past the step we (re)start from, like the JSONL rewrite above

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # pragma: no cover - tensorboard is a core dependency
                Console(stderr=True).print("[yellow]tensorboard not installed: TensorBoard logging off")
        self._wandb = self._mlflow = None
        if wandb and wandb.get("enabled"):
            import wandb as _wandb  # optional; ImportError tells the user what to install

            self._wandb = _wandb.init(project=wandb.get("project"), name=run_name, config=dict(config or {}))
        if mlflow and mlflow.get("enabled"):
            import mlflow as _mlflow

            _mlflow.set_experiment(mlflow.get("project"))
            _mlflow.start_run(run_name=run_name)
            self._mlflow = _mlflow

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write one step's metrics to every enabled sink (non-finite values as strings in JSONL).

        Args:
            step: the RL step.
            metrics: flat `{name: value}`; names as in `docs/metrics.md`.
        """
        clean = {k: float(v) for k, v in metrics.items()}
        if self._jsonl:
            row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log(clean, step=step)
        if self._mlflow:
            self._mlflow.log_metrics({k.replace("/", "."): v for k, v in clean.items()}, step=step)

    def close(self) -> None:
        """Flush and close every sink (JSONL file, TensorBoard writer, wandb run, mlflow run)."""
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        if self._mlflow:
            self._mlflow.end_run()


def progress_bar(enabled: bool, console: Console | None = None) -> Progress:
    """A rich progress bar with a live metrics field (`metrics=` in `update`).

    Args:
        enabled: False gives a disabled (silent) bar, e.g. for non-interactive logs.
        console: the rich console to draw on (default: rich's global console).

    Returns:
        The `Progress`; add tasks with `add_task(..., metrics="")`.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


def summary_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column rich table (name, value) without header, for end-of-run summaries.

    Args:
        title: the table title (left-justified).
        rows: (name, value) pairs, already formatted as text.

    Returns:
        The rich `Table`, ready for `console.print`.
    """
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    return table
