"""Offline training-inference mismatch report: JSON + Markdown + PNG plots, one run per precision.

Reproduces the measurements of "Defeating the Training-Inference Mismatch via FP16"
(https://arxiv.org/abs/2510.26788): KL(µ‖π) per response-length bucket (their Fig. 2), the per-token
log-ratio log π − log µ against log µ (symlog, so that exact zeros stay visible), and the spread of sequence-level log-ratios, plus the headline
KL ratio of each precision over FP16 (the paper reports ~24x for BF16).

Every file is written atomically (temp file in ``out_dir`` + ``os.replace``) and ``report.json``
is written last, so its presence means the report is complete. Plots use
``matplotlib.figure.Figure`` directly, which needs no GUI backend and never touches pyplot state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from nemo_rl_fp16.fsutil import atomic_write
from nemo_rl_fp16.mismatch import PREFIX, bucket_edges, mismatch_metrics, sequence_logratios

REQUIRED_ARRAYS = ("train_logp", "rollout_logp", "mask")
OPTIONAL_ARRAYS = ("train_experts", "rollout_experts")
MAX_SCATTER_POINTS = 20_000
PLOTS = {
    "kl_vs_length": "kl_vs_length.png",
    "logratio_scatter": "logratio_scatter.png",
    "seq_logratio_hist": "seq_logratio_hist.png",
}
_TABLE = (  # (column header, metric key without the prefix)
    ("KL k1", "kl_k1"),
    ("KL k3", "kl_k3"),
    (r"\|log-ratio\| mean", "abs_logratio_mean"),  # pipes escaped for the table
    (r"\|log-ratio\| max", "abs_logratio_max"),
    ("seq log-ratio std", "seq_logratio_std"),
)


def auto_length_buckets(max_len: int, n_bins: int = 8) -> tuple[int, ...]:
    """Linear response-length bucket edges covering [1, max_len] with at most ``n_bins`` bins.

    Args:
        max_len (int): longest response length in the data.
        n_bins (int): maximum number of buckets.

    Returns:
        tuple[int, ...]: strictly increasing upper edges ending at ``max_len`` (``(1,)`` if the
        data has no tokens).
    """
    if max_len < 1:
        return (1,)
    n = min(n_bins, max_len)
    return tuple(sorted({max(1, round(max_len * (k + 1) / n)) for k in range(n)}))


def write_report(
    out_dir: str | os.PathLike,
    runs: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "Training-inference mismatch: KL(µ‖π) by precision",
    length_buckets: Sequence[int] | None = None,
    seed: int = 0,
    numerics: Mapping[str, Any] | None = None,
) -> dict:
    """Compute :func:`~nemo_rl_fp16.mismatch.mismatch_metrics` per precision and write the report.

    Files in ``out_dir``: ``report.json``, ``report.md``, ``kl_vs_length.png``,
    ``logratio_scatter.png``, ``seq_logratio_hist.png``.

    ``report.json`` = ``{"title", "length_buckets", "runs": {precision: {n_sequences, n_tokens,
    <all mismatch/* metrics>, <extra scalars>}}, "ratios": {"kl_k3_<p>_over_fp16": float | None},
    "files": {...}}``. Ratios exist only when an ``fp16`` run is present, one per other precision;
    a ratio over a zero fp16 KL is ``None``. Non-finite numbers are written as ``null``.

    Args:
        out_dir: directory (created if missing).
        runs: precision name (``"fp32"``, ``"fp16"``, ``"bf16"``, …) → dict with numpy/torch
            arrays ``train_logp`` ``[N, T]``, ``rollout_logp`` ``[N, T]``, ``mask`` ``[N, T]``;
            optionally ``train_experts``/``rollout_experts`` ``[N, T, layers, k]`` (flip rate)
            and extra scalar fields (numbers or strings), copied to the JSON and the table.
        title (str): report heading.
        length_buckets (Sequence[int] | None): bucket upper edges; ``None`` picks linear buckets
            from the longest response over all runs (:func:`auto_length_buckets`).
        seed (int): RNG seed for the scatter subsample (≤ ``MAX_SCATTER_POINTS`` per panel).
        numerics (Mapping | None): what decided the low-precision numerics
            (:func:`nemo_rl_fp16.precision.cpu_numerics.numerics_record`), written as ``"numerics"``.

    Returns:
        dict: the JSON content.

    Raises:
        ValueError: no runs, a missing array, or a non-scalar extra field.
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    data = {name: _split_run(name, run) for name, run in runs.items()}
    if length_buckets is None:
        max_len = max(int(arrs["mask"].sum(-1).max(initial=0)) for arrs, _ in data.values())
        length_buckets = auto_length_buckets(max_len)
    buckets = tuple(int(b) for b in length_buckets)

    report: dict[str, Any] = {"title": title, "length_buckets": list(buckets), "runs": {}}
    for name, (arrs, extras) in data.items():
        metrics = mismatch_metrics(
            arrs["train_logp"], arrs["rollout_logp"], arrs["mask"], length_buckets=buckets,
            train_experts=arrs.get("train_experts"), rollout_experts=arrs.get("rollout_experts"),
        )
        report["runs"][name] = {
            "n_sequences": int(arrs["mask"].shape[0]),
            "n_tokens": int(arrs["mask"].sum()),
            **metrics,
            **extras,
        }
    ratios = {}
    if "fp16" in report["runs"]:
        ref = report["runs"]["fp16"][PREFIX + "kl_k3"]
        for name, entry in report["runs"].items():
            if name != "fp16":
                ratios[f"kl_k3_{name}_over_fp16"] = entry[PREFIX + "kl_k3"] / ref if ref > 0 else None
    report["ratios"] = ratios
    if numerics is not None:
        report["numerics"] = dict(numerics)
    report["files"] = {"markdown": "report.md", **PLOTS}
    report = json_safe(report)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    atomic_write(out / PLOTS["kl_vs_length"], lambda f: _plot_kl_vs_length(f, report, buckets))
    atomic_write(out / PLOTS["logratio_scatter"], lambda f: _plot_scatter(f, data, rng))
    atomic_write(out / PLOTS["seq_logratio_hist"], lambda f: _plot_hist(f, data))
    md = _markdown(report).encode()
    atomic_write(out / "report.md", lambda f: f.write(md))
    js = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
    atomic_write(out / "report.json", lambda f: f.write(js))
    return report


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.to(torch.float64)
        return x.numpy()
    return np.asarray(x)


def _split_run(name: str, run: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    missing = [k for k in REQUIRED_ARRAYS if k not in run]
    if missing:
        raise ValueError(f"run {name!r} is missing {missing}; each run needs {list(REQUIRED_ARRAYS)}")
    arrs = {k: _to_numpy(run[k]) for k in REQUIRED_ARRAYS + OPTIONAL_ARRAYS if k in run}
    arrs["mask"] = arrs["mask"] != 0
    extras = {}
    for key, value in run.items():
        if key in arrs:
            continue
        if isinstance(value, str):
            extras[key] = value
            continue
        value = _to_numpy(value)
        if value.ndim != 0:
            raise ValueError(
                f"run {name!r} field {key!r} is not a scalar (shape {value.shape}); extra fields "
                f"must be numbers or strings, arrays are only {list(REQUIRED_ARRAYS + OPTIONAL_ARRAYS)}"
            )
        extras[key] = value.item()
    return arrs, extras


def json_safe(x: Any) -> Any:
    """`x` with non-finite floats replaced by None (strict JSON), recursively through dicts and lists.

    Args:
        x (Any): a JSON-bound value (dicts, lists, floats, ...).

    Returns:
        Any: a copy of the dict/list structure with NaN and ±inf floats as None; other values as given.
    """
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3e}"
    return str(x)


def _markdown(report: dict) -> str:
    runs = report["runs"]
    known = {"n_sequences", "n_tokens"}
    extra_keys = sorted({k for e in runs.values() for k in e if k not in known and not k.startswith(PREFIX)})
    header = ["precision", "sequences", "tokens", *(h for h, _ in _TABLE), *extra_keys]
    lines = [f"# {report['title']}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for name, e in runs.items():
        cells = [name, str(e["n_sequences"]), str(e["n_tokens"])]
        cells += [_fmt(e.get(PREFIX + key)) for _, key in _TABLE]
        cells += [_fmt(e.get(k, "")) for k in extra_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report["ratios"]:
        for key, value in report["ratios"].items():
            other = key[len("kl_k3_"):-len("_over_fp16")]
            lines.append(f"- KL(µ‖π) k3, {other} vs fp16: {ratio_text(value, other)}")
    else:
        lines.append("- No fp16 run, so no KL ratio over fp16.")
    flips = {name: e for name, e in runs.items() if PREFIX + "router_topk_flip_rate" in e}
    if flips:  # MoE: fraction of (token, layer) pairs whose top-k expert set differs, trainer vs rollout
        lines += ["", "MoE router top-k flip rate (trainer's own routing vs the rollout's, before any replay):", ""]
        for name, e in flips.items():
            layers = sorted((k for k in e if k.startswith(PREFIX + "router_topk_flip_rate/layer")),
                            key=lambda k: int(k.rsplit("layer", 1)[1]))
            per = ", ".join(f"{k.rsplit('/', 1)[1]} {_fmt(e[k])}" for k in layers)
            lines.append(f"- {name}: {_fmt(e[PREFIX + 'router_topk_flip_rate'])} ({per})")
    lines += ["", f"Length buckets (upper edges): {report['length_buckets']}", ""]
    if "numerics" in report:
        lines += ["Numerics: " + ", ".join(f"{k} `{v}`" for k, v in report["numerics"].items()), ""]
    lines += [f"![{stem}]({png})" for stem, png in PLOTS.items()]
    return "\n".join(lines) + "\n"


def ratio_text(value: float | None, other: str) -> str:
    """A KL ratio `other / fp16` as words a reader cannot misread.

    E.g. "**62.5x** fp16's", "fp16's is 1.2e+05x larger", "0 (bitwise equal π and µ)", never "0.00x".

    Args:
        value (float | None): the ratio `other KL / fp16 KL`; None when fp16's KL is 0.
        other (str): the other precision's label (e.g. `bf16`).

    Returns:
        str: Markdown text for the report.
    """
    if value is None:
        return "n/a (fp16 KL is 0)"
    if value == 0:
        return f"{other} KL is 0 (π and µ bitwise equal)"
    if value < 0.1:
        return f"{other} is **{1 / value:.3g}x smaller** than fp16"
    return f"**{value:.3g}x** fp16's"


def symlog_floor(values: Sequence[float]) -> float:
    """Linear threshold for a symlog axis: a decade below the smallest positive value.

    Exact zeros then sit visibly on the axis instead of vanishing from a log scale.

    Args:
        values (Sequence[float]): the plotted values (None and non-finite ones are skipped).

    Returns:
        float: the smallest positive finite value / 10, or 1e-12 when there is none.
    """
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return min(pos) / 10 if pos else 1e-12


def _figure(ncols: int = 1, bottom: float = 0.13):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib ships with the package's deps
        raise ImportError("write_report needs matplotlib: pip install matplotlib") from e
    # Fixed margins instead of constrained/tight layout: same look here, half the render time.
    fig = Figure(figsize=(4.5 * ncols, 4.0))
    fig.subplots_adjust(left=0.16 / ncols, right=1 - 0.04 / ncols, bottom=bottom, top=0.9,
                        wspace=0.3)
    return fig


def _plot_kl_vs_length(f: IO[bytes], report: dict, buckets: tuple[int, ...]) -> None:
    names = [name for _, _, name in bucket_edges(buckets)  # buckets some run has data for
             if any(f"{PREFIX}kl_by_length/{name}" in e for e in report["runs"].values())]
    fig = _figure(bottom=0.24)
    ax = fig.add_subplot()
    every = []
    for prec, entry in report["runs"].items():
        pts = [(i, entry.get(f"{PREFIX}kl_by_length/{b}")) for i, b in enumerate(names)]
        pts = [(i, v) for i, v in pts if v is not None]
        every += [v for _, v in pts]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=prec)
    if every:  # symlog: exact zeros (fp32 on some hosts) stay on the plot, below the floor line
        floor = symlog_floor(every)
        ax.set_yscale("symlog", linthresh=floor)
        ax.axhline(floor, color="gray", linewidth=0.6, linestyle=":")
        ax.legend()
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("KL(µ‖π), k3 estimator")
    ax.set_title("Mismatch KL vs response length")
    fig.savefig(f, format="png", dpi=100)


def _plot_scatter(f: IO[bytes], data: dict, rng: np.random.Generator) -> None:
    fig = _figure(len(data))
    for k, (prec, (arrs, _)) in enumerate(data.items()):
        ax = fig.add_subplot(1, len(data), k + 1)
        m = arrs["mask"]
        mu = arrs["rollout_logp"][m].astype(np.float64)
        diff = arrs["train_logp"][m].astype(np.float64) - mu
        if mu.size > MAX_SCATTER_POINTS:
            idx = rng.choice(mu.size, MAX_SCATTER_POINTS, replace=False)
            mu, diff = mu[idx], diff[idx]
        ax.scatter(mu, diff, s=2, alpha=0.3, linewidths=0)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        # symlog: |log π − log µ| spans 1e-7 (fp16) to 1e-1; zeros (bitwise equal) sit on the line
        ax.set_yscale("symlog", linthresh=symlog_floor(np.abs(diff).tolist()))
        ax.set(xlabel="log µ (rollout) of the token", ylabel="log π − log µ", title=prec)
    fig.savefig(f, format="png", dpi=100)


def _plot_hist(f: IO[bytes], data: dict) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    seqs = {p: sequence_logratios(a["train_logp"], a["rollout_logp"], a["mask"]).cpu().numpy()
            for p, (a, _) in data.items()}
    values = np.concatenate([v for v in seqs.values()] + [np.zeros(1)])
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 51)
    for prec, v in seqs.items():
        ax.hist(v[np.isfinite(v)], bins=bins, histtype="step", label=prec)
    ax.legend()
    ax.set_xlabel("sequence log-ratio Σ_t (log π − log µ)")
    ax.set_ylabel("sequences")
    ax.set_title("Sequence-level log-ratio")
    fig.savefig(f, format="png", dpi=100)
