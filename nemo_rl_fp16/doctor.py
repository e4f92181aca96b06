"""Mismatch doctor: where, layer by layer, the rollout engine µ and the trainer π part.

`nemo-rl-fp16 doctor recipe=... [precision=fp16,bf16]` samples a fixed set of responses once
(the recipe's rollout engine in the first precision, fp32 by default), then for each precision
replays the *same tokens* through both paths with forward hooks on every decoder block and its
parts:

- the rollout engine's path: `TorchRolloutEngine`'s prefill over the left-padded prompts, then one
  KV-cached forward per response token under `cpu_numerics.kernel_profile("decode")` (its decode
  kernels), exactly as `generate` runs them;
- the trainer's path: one full-sequence forward of `TorchPolicy`'s compute copy, as
  `modeling.response_logprobs` runs it (prefill/training kernels).

The decode step that predicts response token t and the one-pass position `P + t - 1` are aligned
token for token; padding and finished rows are masked out. Per probe point the divergence is
reported in units of the precision's unit roundoff u (2^-11 fp16, 2^-8 bf16, 2^-24 fp32):

- `rel_norm` = ‖a − b‖_F / ‖b‖_F over the valid tokens (a: decode path, b: one-pass path);
- `rel_max` = max over valid tokens of ‖a_t − b_t‖_∞ / ‖b_t‖_∞.

A probe point is *flagged* when `rel_norm / u` exceeds the noise level `noise_u` (`NOISE_U` = 2 u
for fp16/bf16, a few roundings' worth; 2·sqrt(K) u for fp32; any non-finite value is flagged). The report names the first flagged point in forward order, the
block whose residual-stream output divergence grows the most over its input's, the per-token
log-prob gap |log µ − log π| and how each point's per-token divergence correlates with that gap.
Plumbing (`run_doctor`, report files) lives in :mod:`nemo_rl_fp16.doctor_report`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import DynamicCache

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.modeling import decoder_layers, position_ids_from_mask, response_logprobs, token_logprobs
from nemo_rl_fp16.precision.cpu_numerics import cpu_numerics, kernel_profile

#: unit roundoff u = 2^-(mantissa bits + 1) of each precision preset
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8, "fp32": 2.0**-24}
#: a probe point is flagged when its relative-norm divergence exceeds this many u (fp16/bf16: the
#: package kernels accumulate exactly and round each output once, so one rounding on each side is
#: ~0.5-0.8 u; fp32 runs the host's BLAS, whose summation order differs between a one-row decode
#: GEMM and a whole-sequence GEMM: its noise is ~sqrt(K) u for dot products of length K, see `noise_u`)
NOISE_U = 2.0
#: the parts of a decoder block probed (HF names), in forward order; missing ones are skipped
BLOCK_PARTS = (("input_layernorm", "input norm"), ("self_attn", "attention output"),
               ("post_attention_layernorm", "post-attention norm"), ("mlp", "MLP/MoE output"))


def unit_roundoff(precision: str | torch.dtype) -> float:
    """Unit roundoff u of a preset name or a float dtype: `torch.finfo(dtype).eps / 2`.

    Args:
        precision: "fp16" | "bf16" | "fp32", or a floating-point `torch.dtype`.

    Returns:
        u: 2^-11 (fp16), 2^-8 (bf16), 2^-24 (fp32).

    Raises:
        ValueError: an unknown preset name.
    """
    if isinstance(precision, torch.dtype):
        return torch.finfo(precision).eps / 2
    if precision not in UNIT_ROUNDOFF:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(UNIT_ROUNDOFF)}")
    return UNIT_ROUNDOFF[precision]


def noise_u(precision: str, model: torch.nn.Module) -> float:
    """The rounding-noise level, in u, above which a probe point is flagged.

    fp16/bf16: `NOISE_U`. fp32: `NOISE_U * sqrt(K)`, K the longest dot product of the model
    (the largest `in_features` of its linear layers), the typical error of an fp32 sum of K terms
    in another order.

    Args:
        precision: the preset name being replayed ("fp16", "bf16", "fp32").
        model: the model (its `nn.Linear` layers give K; only read for fp32).

    Returns:
        The flag threshold in units of u.
    """
    if precision != "fp32":
        return NOISE_U
    k = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=1)
    return NOISE_U * math.sqrt(k)


def probe_points(model: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(name, description, module) of every probe point of an HF causal LM, in forward order.

    Per block i: `layers.i.input_layernorm`, `layers.i.self_attn`, `layers.i.post_attention_layernorm`,
    `layers.i.mlp` (those that exist) and `layers.i` (the block output, the residual stream); then
    `norm` (final norm = the last hidden state) and `logits` (the output embedding).

    Args:
        model: an HF causal LM (Llama/Qwen layout: `get_decoder()` or `.model` holding `layers`).

    Returns:
        The probe points; hook each module's forward output.

    Raises:
        TypeError: the model has no decoder layer stack (from `modeling.decoder_layers`).
    """
    pts = []
    for i, layer in enumerate(decoder_layers(model)):
        for part, what in BLOCK_PARTS:
            sub = getattr(layer, part, None)
            if isinstance(sub, torch.nn.Module):
                pts.append((f"layers.{i}.{part}", what, sub))
        pts.append((f"layers.{i}", "block output (residual stream)", layer))
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    norm = getattr(inner, "norm", None)
    if isinstance(norm, torch.nn.Module):
        pts.append(("norm", "final norm (last hidden state)", norm))
    head = model.get_output_embeddings()
    if head is not None:
        pts.append(("logits", "logits (lm_head)", head))
    return pts


class Recorder:
    """Forward hooks on `probe_points(model)` keeping a window of positions of each output.

    `window(length) -> slice` picks the positions kept from an output of sequence length `length`
    (default: all); kept outputs are stored detached (in their own dtype) and concatenated along
    the sequence by `outputs()`, then along rows by the caller. Use as a context manager: hooks
    are registered on enter and removed on exit.

    Args:
        model: the HF causal LM to probe (see `probe_points`).
    """

    def __init__(self, model: torch.nn.Module):
        self.points = probe_points(model)
        self.window = lambda length: slice(0, length)
        self._seen: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in self.points}
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self._seen[name].append(h.detach()[:, self.window(h.shape[1])].clone())
        return hook

    def __enter__(self) -> Recorder:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, _, m in self.points]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def outputs(self) -> dict[str, torch.Tensor]:
        """The outputs recorded so far, concatenated along positions; clears the record.

        Returns:
            Name -> `[rows, positions, width]` tensor in the module's output dtype (probe points that
            saw no forward are left out).
        """
        out = {n: torch.cat(v, 1) for n, v in self._seen.items() if v}
        for v in self._seen.values():
            v.clear()
        return out


def decode_path(engine: Any, batch: RolloutBatch, temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Replay `batch`'s tokens through the rollout engine's prefill + KV-cached decode, hooked.

    Mirrors `TorchRolloutEngine._generate_chunk` with the tokens forced: prefill over the
    left-padded prompts, then step t feeds response token t−1 (attention-mask column = its
    response-mask bit) under `kernel_profile("decode")`; rows go in chunks of `max_batch_size`.

    Args:
        engine: a `TorchRolloutEngine` (reads `model`, `device`, `precision`, `max_batch_size`
            and its `_forward`).
        batch: the sampled rollouts, N rows, prompt width P, T response tokens.
        temperature: the sampling temperature the log-probs are taken at.

    Returns:
        ({probe name: `[N, T, width]` output at the positions predicting response tokens 0..T−1},
        `[N, T]` fp32 log µ of the response tokens at `temperature`, computed as the engine's sampler
        does, inside its numerics scope).
    """
    p, n_resp = batch.prompt_width, batch.response_mask.shape[1]
    rec = Recorder(engine.model)
    rec.window = lambda length: slice(length - 1, length)  # the last position of each forward
    parts: dict[str, list[torch.Tensor]] = {}
    logps = []
    with torch.no_grad(), cpu_numerics(engine.device, engine.precision.param_dtype), rec:
        for start in range(0, batch.num_samples, engine.max_batch_size):
            mb = batch.select(slice(start, start + engine.max_batch_size))
            ids, resp = mb.input_ids.to(engine.device), mb.response_mask.to(engine.device)
            attn = mb.attention_mask[:, :p].to(engine.device)
            cache = DynamicCache(config=engine.model.config)
            steps = [engine._forward(ids[:, :p], attn, position_ids_from_mask(attn), cache)]
            for t in range(1, n_resp):
                attn = torch.cat([attn, resp[:, t - 1:t]], 1)
                with kernel_profile("decode"):
                    steps.append(engine._forward(ids[:, p + t - 1:p + t], attn,
                                                 position_ids_from_mask(attn)[:, -1:], cache))
            logps.append(token_logprobs(torch.stack(steps, 1), ids[:, p:], temperature,
                                        engine.precision.logits_dtype).float().cpu())
            for name, t in rec.outputs().items():
                parts.setdefault(name, []).append(t)
    return {n: torch.cat(v) for n, v in parts.items()}, torch.cat(logps)


def onepass_path(trainer: Any, batch: RolloutBatch, temperature: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Score `batch` with the trainer's one full-sequence forward (`response_logprobs`), hooked.

    Uses `TorchPolicy`'s compute copy (synced from the fp32 master weights first) under its
    numerics scope, in its micro-batches.

    Args:
        trainer: a `TorchPolicy` (reads `compute`, `device`, `precision` and its private
            `_sync_compute`, `_gemm_ctx`, `_micro_batches`).
        batch: the same rollouts as given to `decode_path`.
        temperature: the sampling temperature the log-probs are taken at.

    Returns:
        ({probe name: `[N, T, width]` output at positions P−1 .. P+T−2}, `[N, T]` fp32 log π).
    """
    n_resp = batch.response_mask.shape[1]
    trainer._sync_compute()
    rec = Recorder(trainer.compute)
    rec.window = lambda length: slice(length - n_resp - 1, length - 1)
    parts: dict[str, list[torch.Tensor]] = {}
    logps = []
    with torch.no_grad(), trainer._gemm_ctx(), rec:
        for rows in trainer._micro_batches(batch.num_samples):
            mb = batch.select(rows)
            logps.append(response_logprobs(trainer.compute, mb.input_ids.to(trainer.device),
                                           mb.attention_mask.to(trainer.device), mb.prompt_width, temperature,
                                           trainer.precision.logits_dtype).float().cpu())
            for name, t in rec.outputs().items():
                parts.setdefault(name, []).append(t)
    return {n: torch.cat(v) for n, v in parts.items()}, torch.cat(logps)


def divergence(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Divergence of `a` (decode path) from `b` (one-pass path) over the masked tokens.

    Args:
        a: `[N, T, W]` decode-path outputs (any float dtype).
        b: `[N, T, W]` one-pass outputs, the reference.
        mask: `[N, T]` valid-token mask (response tokens of unfinished rows).

    Returns:
        dict with `rel_norm` (‖a−b‖_F / ‖b‖_F over masked tokens), `rel_max` (max over masked
        tokens of ‖a_t−b_t‖_∞ / ‖b_t‖_∞), `per_token` (`[n_masked]` float64 ‖a_t−b_t‖₂ / ‖b_t‖₂)
        and `finite` (False if either side has a non-finite value at a masked token: then both
        metrics are inf, never a small number). Computed in float64; no masked token gives 0.0.

    Raises:
        ValueError: `a` and `b` differ in shape, or `mask` is not their `[N, T]`.
    """
    if a.shape != b.shape or tuple(a.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"decode and one-pass outputs must align: {tuple(a.shape)} vs {tuple(b.shape)}, "
                         f"mask {tuple(mask.shape)}")
    m = mask.bool()
    a64, b64 = a.double()[m], b.double()[m]  # [n, W]
    finite = bool(torch.isfinite(a64).all() and torch.isfinite(b64).all())
    if not finite:
        inf = torch.full((a64.shape[0],), math.inf, dtype=torch.float64)
        return {"rel_norm": math.inf, "rel_max": math.inf, "per_token": inf, "finite": False}
    d = a64 - b64
    tiny = torch.finfo(torch.float64).tiny
    per_token = d.norm(dim=-1) / b64.norm(dim=-1).clamp_min(tiny)
    rel_max = d.abs().amax(-1) / b64.abs().amax(-1).clamp_min(tiny)
    return {"rel_norm": float(d.norm() / b64.norm().clamp_min(tiny)) if d.numel() else 0.0,
            "rel_max": float(rel_max.max()) if rel_max.numel() else 0.0,
            "per_token": per_token, "finite": True}


def _corr(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two float64 vectors (None when undefined)."""
    if x.numel() < 3 or not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return None
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None


def compare(decode: dict[str, torch.Tensor], onepass: dict[str, torch.Tensor], mask: torch.Tensor,
            points: Sequence[tuple[str, str, Any]], precision: str, logp_gap: torch.Tensor,
            noise: float = NOISE_U) -> dict[str, Any]:
    """Per-probe divergence table for one precision, plus first flagged / fastest growth.

    Args:
        decode: name -> `[N, T, W]` outputs of the rollout engine's path (KV-cached decode).
        onepass: name -> `[N, T, W]` outputs of the trainer's path (one full-sequence forward).
        mask: `[N, T]` response mask.
        points: `probe_points` of the model (names, descriptions, in forward order).
        precision: preset name, for u.
        logp_gap: `[N, T]` |log µ − log π| per token.
        noise: flag threshold in u (`noise_u`).

    Returns:
        {"u", "noise_u", "layers": [{name, what, rel_norm, rel_max, rel_norm_u, rel_max_u, flagged,
        corr_logp_gap}], "first_flagged": name | None, "fastest_growth": {name, from, by_u} | None}.
    """
    u = unit_roundoff(precision)
    gap = logp_gap.double()[mask.bool()]
    rows = []
    for name, what, _ in points:
        d = divergence(decode[name], onepass[name], mask)
        rows.append({"name": name, "what": what, "rel_norm": d["rel_norm"], "rel_max": d["rel_max"],
                     "rel_norm_u": d["rel_norm"] / u, "rel_max_u": d["rel_max"] / u,
                     "flagged": (not d["finite"]) or d["rel_norm"] / u > noise,
                     "corr_logp_gap": _corr(d["per_token"], gap)})
    first = next((r["name"] for r in rows if r["flagged"]), None)
    # growth along the residual stream: each block output against its input (the previous block's; 0 before)
    stream = [r for r in rows if r["name"].count(".") == 1 and r["name"].startswith("layers.")]
    growth, prev = None, {"name": "embeddings", "rel_norm_u": 0.0}
    for r in stream:
        by = r["rel_norm_u"] - prev["rel_norm_u"]
        if growth is None or by > growth["by_u"]:
            growth = {"name": r["name"], "from": prev["name"], "by_u": by}
        prev = r
    return {"u": u, "noise_u": noise, "layers": rows, "first_flagged": first, "fastest_growth": growth}


def replay(engine: Any, trainer: Any, batch: RolloutBatch, precision: str, temperature: float) -> dict[str, Any]:
    """Replay `batch` through both paths of one precision and compare them (see module doc).

    Args:
        engine: the rollout engine in this precision (`decode_path`).
        trainer: the policy in this precision (`onepass_path`).
        batch: the fixed responses, sampled once for all precisions.
        precision: the preset name ("fp16", "bf16", "fp32"), for u and the noise level.
        temperature: the sampling temperature.

    Returns:
        `compare(...)`'s dict plus `logp` {decode, onepass} (`[N, T]` fp32 tensors, 0 at masked
        positions), and `logp_gap` {mean, max} of |log µ − log π| over valid tokens.

    Raises:
        ValueError: the two paths' outputs do not align (`divergence`).
    """
    dec, logp_roll = decode_path(engine, batch, temperature)
    one, logp_train = onepass_path(trainer, batch, temperature)
    mask = batch.response_mask.bool()
    gap = (logp_roll.double() - logp_train.double()).abs().masked_fill(~mask, 0.0)
    out = compare(dec, one, mask, probe_points(engine.model), precision, gap, noise_u(precision, engine.model))
    out["logp"] = {"decode": logp_roll.masked_fill(~mask, 0.0), "onepass": logp_train.masked_fill(~mask, 0.0)}
    valid = gap[mask]
    out["logp_gap"] = {"mean": float(valid.mean()) if valid.numel() else 0.0,
                       "max": float(valid.max()) if valid.numel() else 0.0}
    return out


@contextmanager
def planted_fault(model: torch.nn.Module, param: str, scale: float = 1.0 + 1e-2) -> Iterator[None]:
    """Scale the parameter named `param` of `model` by `scale`, in its own dtype; restored on exit.

    A test fixture for the doctor: e.g. the rollout engine's `model.layers.1.input_layernorm.weight`.

    Args:
        model: the module whose parameter is perturbed in place.
        param: the full parameter name (`model.named_parameters()`).
        scale: the factor (default 1.01).

    Yields:
        None; inside the block the parameter is scaled, after it the saved copy is written back.

    Raises:
        KeyError: `model` has no parameter of that name (the message lists a few that exist).
    """
    params = dict(model.named_parameters())
    if param not in params:
        raise KeyError(f"no parameter {param!r}; e.g. {', '.join(list(params)[:4])}")
    w = params[param]
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(scale)
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)
