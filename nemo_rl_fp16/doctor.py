"""Mismatch doctor: where, layer by layer, the rollout engine µ and the trainer π part.

`nemo-rl-fp16 doctor recipe=... [precision=fp16,bf16]` samples a fixed set of responses once
(the recipe's rollout engine in the first precision, fp32 by default), then for each precision
replays the *same tokens* through both paths with forward hooks on every decoder block and its
parts:

- the rollout engine's path: `TorchRolloutEngine`'s prefill over the left-padded prompts, then one
  KV-cached forward per response token under `cpu_numerics.kernel_profile("decode")` (its decode
  kernels), exactly as `generate` runs them;
- the trainer's path: one full-sequence forward of the policy's compute copy, scored as the
  policy scores (`policy.adapter.score`; prefill/training kernels): `TorchPolicy`'s HF model or
  `MegatronPolicy`'s `GPTModel`, hooked under the HF names (:mod:`nemo_rl_fp16.doctor_probes`).

An engine that cannot be hooked (vLLM) gets `logprob_only`: its own log µ against the trainer's
log π, and the one-line statement `VLLM_UNSEEN` of what is not visible.

The decode step that predicts response token t and the one-pass position `P + t - 1` are aligned
token for token; padding and finished rows are masked out. Per probe point the divergence is
reported in units of the precision's unit roundoff u (`precision.unit_roundoff`: 2^-11 fp16,
2^-8 bf16, 2^-24 fp32):

- `rel_norm` = ‖a − b‖_F / ‖b‖_F over the valid tokens (a: decode path, b: one-pass path);
- `rel_max` = max over valid tokens of ‖a_t − b_t‖_∞ / ‖b_t‖_∞.

A probe point is *flagged* when the two paths part by more than rounding explains. Rounding noise
is measured per point on the same tokens, against the floor's (fp32) run of the same batch:
`noise_ref` = min(‖a − a₃₂‖ / ‖a₃₂‖, ‖b − b₃₂‖ / ‖b₃₂‖), how far the better of the two paths sits
from its own fp32 output (a₃₂: the fp32 rollout engine's decode path, b₃₂: the fp32 trainer's one
pass; the smaller of the two, so a fault on either side cannot raise its own noise level). A point
is flagged when `rel_norm / noise_ref` exceeds `NOISE_RATIO` (1.0): the engines disagree with each
other more than the better of them disagrees with exact arithmetic. Measured on the tiny models:
healthy torch pairs sit at 0.2-0.66x (same roundings at the same places), the megatron trainer
against the torch engine at <= 0.88x; a 1% fault in one weight, on either side, at >= 1.14x in
bf16 (where it is only ~2.6 roundings) and >= 9x in fp16. This level follows each point's own
noise (an MLP's SwiGLU or a deep residual stream carry more than a norm output). Without
a reference (the fp32 floor itself, or `replay(..., reference=None)`) the bare level `noise_u`
is used (`NOISE_U` = 2 u for fp16/bf16; 2·sqrt(K) u for fp32). Any non-finite value is flagged.
MoE: the router-logit gap and each router's top-k flip rate per layer; an MoE block flagged only
by the tokens whose top-k set flipped says so (`flag_cause`). The report names the first flagged
point in forward order, the block whose residual-stream output divergence grows the most over its
input's, the per-token log-prob gap |log µ − log π| and how each point's per-token divergence
correlates with that gap.
Plumbing (`run_doctor`, report files) lives in :mod:`nemo_rl_fp16.doctor_report`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import DynamicCache

from nemo_rl_fp16.doctor_probes import Probe, Recorder, probes
from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.modeling import position_ids_from_mask, token_logprobs
from nemo_rl_fp16.precision import unit_roundoff
from nemo_rl_fp16.precision.cpu_numerics import cpu_numerics, kernel_profile

__all__ = ["NOISE_RATIO", "NOISE_U", "VLLM_UNSEEN", "compare", "decode_path", "divergence", "logprob_only",
           "noise_u", "onepass_path", "planted_fault", "probe_points", "replay", "unit_roundoff"]

#: a probe point is flagged when its relative-norm divergence exceeds this many u (fp16/bf16: the
#: package kernels accumulate exactly and round each output once, so one rounding on each side is
#: ~0.5-0.8 u; fp32 runs the host's BLAS, whose summation order differs between a one-row decode
#: GEMM and a whole-sequence GEMM: its noise is ~sqrt(K) u for dot products of length K, see `noise_u`)
NOISE_U = 2.0
#: with a per-point rounding reference (module doc): flagged when rel_norm / noise_ref exceeds this
NOISE_RATIO = 1.0


def noise_u(precision: str, model: torch.nn.Module) -> float:
    """The rounding-noise level, in u, above which a probe point is flagged.

    fp16/bf16: `NOISE_U`. fp32: `NOISE_U * sqrt(K)`, K the longest dot product of the model
    (the largest `in_features` of its linear layers), the typical error of an fp32 sum of K terms
    in another order. The level a point is flagged above when there is no fp32 reference.

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


def probe_points(model: torch.nn.Module) -> list[Probe]:
    """The probe points of an HF causal LM or a `MegatronCausalLM`, in forward order, HF names.

    Per block i: `layers.i.input_layernorm`, `layers.i.self_attn`, `layers.i.post_attention_layernorm`,
    `layers.i.mlp.gate` (MoE router logits), `layers.i.mlp` (those that exist) and `layers.i` (the
    block output, the residual stream); then `norm` and `logits` (:mod:`nemo_rl_fp16.doctor_probes`).

    Args:
        model: an HF causal LM or the megatron policy's `MegatronCausalLM`.

    Returns:
        The probe points (`doctor_probes.Probe`: name, description, module, extractors).

    Raises:
        TypeError: an HF model without a decoder layer stack (`modeling.decoder_layers`).
    """
    return probes(model)[0]


def decode_path(engine: Any, batch: RolloutBatch, temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Replay `batch`'s tokens through the rollout engine's prefill + KV-cached decode, hooked.

    Mirrors `TorchRolloutEngine.generate` with the tokens forced: `forward_step` over the
    left-padded prompts, then step t feeds response token t−1 (attention-mask column = its
    response-mask bit) under `kernel_profile("decode")`; rows go in chunks of `max_batch_size`.
    Like `generate`, a chunk stops after the last step any of its rows needs; its later positions
    (all masked) are zeros.

    Args:
        engine: a `TorchRolloutEngine` (reads `model`, `device`, `precision`, `max_batch_size`
            and calls `forward_step`).
        batch: the sampled rollouts, N rows, prompt width P, T response tokens.
        temperature: the sampling temperature the log-probs are taken at.

    Returns:
        ({probe name: `[N, T, width]` output at the positions predicting response tokens 0..T−1},
        `[N, T]` fp32 log µ of the response tokens at `temperature`, computed as the engine's sampler
        does, inside its numerics scope). Positions after a chunk's longest response hold 0.
    """
    p, n_resp = batch.prompt_width, batch.response_mask.shape[1]
    rec = Recorder(engine.model)
    rec.window = lambda length: slice(length - 1, length)  # the last position of each forward
    parts: dict[str, list[torch.Tensor]] = {}
    logps = []
    with torch.no_grad(), cpu_numerics(engine.device, engine.precision.param_dtype), rec:
        for start in range(0, batch.num_samples, engine.max_batch_size):
            mb = batch.select(slice(start, start + engine.max_batch_size))
            rec.begin(mb.num_samples)
            ids, resp = mb.input_ids.to(engine.device), mb.response_mask.to(engine.device)
            attn = mb.attention_mask[:, :p].to(engine.device)
            cache = DynamicCache(config=engine.model.config)
            live = resp.any(0).nonzero()
            needed = int(live.max()) + 1 if live.numel() else 1  # steps this chunk's rows use
            steps = [engine.forward_step(ids[:, :p], attn, position_ids_from_mask(attn), cache)]
            for t in range(1, needed):
                attn = torch.cat([attn, resp[:, t - 1:t]], 1)
                with kernel_profile("decode"):
                    steps.append(engine.forward_step(ids[:, p + t - 1:p + t], attn,
                                                     position_ids_from_mask(attn)[:, -1:], cache))
            logps.append(_pad_positions(token_logprobs(torch.stack(steps, 1), ids[:, p:p + needed], temperature,
                                                       engine.precision.logits_dtype).float().cpu(), n_resp))
            for name, t in rec.outputs().items():
                parts.setdefault(name, []).append(_pad_positions(t, n_resp))
    return {n: torch.cat(v) for n, v in parts.items()}, torch.cat(logps)


def _pad_positions(t: torch.Tensor, width: int) -> torch.Tensor:
    """`[rows, k, ...]` -> `[rows, width, ...]`, zeros after position k."""
    if t.shape[1] == width:
        return t
    out = t.new_zeros((t.shape[0], width, *t.shape[2:]))
    out[:, :t.shape[1]] = t
    return out


def onepass_path(trainer: Any, batch: RolloutBatch, temperature: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Score `batch` with the policy's one full-sequence forward, hooked.

    What `logprobs` runs: `policy.adapter.score` (`modeling.response_logprobs` for `TorchPolicy`,
    the vocab-parallel scoring for `MegatronPolicy`; routed to `batch.rollout_experts` under R3)
    on the compute copy (synced from the fp32 master first), inside `policy.adapter.numerics()`, in
    the policy's micro-batches (`policy.loop.slices`).

    Args:
        trainer: a `TorchPolicy` or `MegatronPolicy` (reads `weights`, `compute`, `adapter`, `loop`).
        batch: the same rollouts as given to `decode_path`.
        temperature: the sampling temperature the log-probs are taken at.

    Returns:
        ({probe name: `[N, T, width]` output at positions P−1 .. P+T−2}, `[N, T]` fp32 log π).
    """
    n_resp = batch.response_mask.shape[1]
    if trainer.weights is not None:  # None: megatron's CUDA path, where the optimizer owns the master
        trainer.weights.sync_compute()
    rec = Recorder(trainer.compute)
    rec.window = lambda length: slice(length - n_resp - 1, length - 1)
    parts: dict[str, list[torch.Tensor]] = {}
    logps = []
    with torch.no_grad(), trainer.adapter.numerics(), rec:
        for rows in trainer.loop.slices(batch.num_samples):
            mb = batch.select(rows)
            rec.begin(mb.num_samples, mb.attention_mask)
            logps.append(trainer.adapter.score(mb, temperature).float().cpu())
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
    _check_aligned(a, b, mask)
    m = mask.bool()
    return _divergence64(a[m].double(), b[m].double())


def _check_aligned(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    if a.shape != b.shape or tuple(a.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"decode and one-pass outputs must align: {tuple(a.shape)} vs {tuple(b.shape)}, "
                         f"mask {tuple(mask.shape)}")


def _divergence64(a64: torch.Tensor, b64: torch.Tensor, full: bool = True) -> dict[str, Any]:
    """`divergence` of the masked tokens `a64`, `b64` (`[n, W]` float64, exact casts of the outputs).

    Finite iff ‖a − b‖ and ‖b‖ are (a non-finite value on either side makes one of them inf or
    NaN; finite outputs of a float16/bfloat16/float32 model cannot overflow a float64 norm), so no
    elementwise check is needed. `full=False`: `rel_norm` and `finite` only (the rounding
    reference needs no more).
    """
    d = a64 - b64
    d_norm, b_norm = d.norm(), b64.norm()
    if not bool(torch.isfinite(d_norm) & torch.isfinite(b_norm)):
        inf = torch.full((a64.shape[0],), math.inf, dtype=torch.float64)
        return {"rel_norm": math.inf, "rel_max": math.inf, "per_token": inf, "finite": False}
    tiny = torch.finfo(torch.float64).tiny
    out = {"rel_norm": float(d_norm / b_norm.clamp_min(tiny)) if d.numel() else 0.0, "finite": True}
    if full:
        rel_max = d.abs().amax(-1) / b64.abs().amax(-1).clamp_min(tiny)
        out["rel_max"] = float(rel_max.max()) if rel_max.numel() else 0.0
        out["per_token"] = d.norm(dim=-1) / b64.norm(dim=-1).clamp_min(tiny)
    return out


def _corr(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two float64 vectors (None when undefined)."""
    if x.numel() < 3 or not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return None
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None


def compare(decode: dict[str, torch.Tensor], onepass: dict[str, torch.Tensor], mask: torch.Tensor,
            points: Sequence[tuple[str, str, Any]], precision: str, logp_gap: torch.Tensor,
            noise: float = NOISE_U, unseen: dict[str, str] | None = None,
            noise_ref: dict[str, float] | None = None,
            divergences: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-probe divergence table for one precision, plus first flagged / fastest growth.

    Args:
        decode: name -> `[N, T, W]` outputs of the rollout engine's path (KV-cached decode); MoE
            routers also `<name>:topk` `[N, T, k]` expert ids.
        onepass: name -> `[N, T, W]` outputs of the trainer's path (one full-sequence forward).
        mask: `[N, T]` response mask.
        points: `probe_points` of the model (names, descriptions, in forward order).
        precision: preset name, for u.
        logp_gap: `[N, T]` |log µ − log π| per token.
        noise: flag threshold in u (`noise_u`).
        unseen: {name: why} for points the trainer's model cannot show (megatron TE spec).
        noise_ref: {name: min(‖a − a₃₂‖ / ‖a₃₂‖, ‖b − b₃₂‖ / ‖b₃₂‖)}, the per-point rounding
            reference (module doc); when given, a point is flagged above `NOISE_RATIO` of it
            instead of above `noise` u.
        divergences: {name: `divergence(decode[name], onepass[name], mask)`} already computed
            (`replay` computes them alongside `noise_ref`, casting each output once); missing
            points are computed here.

    Returns:
        {"u", "noise_u", "noise_ratio" (None without reference), "layers": [{name, what, visible,
        rel_norm, rel_max, rel_norm_u, rel_max_u, noise_ref_u, ratio (rel_norm / noise_ref),
        flagged, corr_logp_gap, [topk_flip_rate: MoE routers, fraction of response tokens whose
        top-k expert set differs], [rel_norm_u_unflipped: the MoE block over the tokens without a
        flip; flag_cause "top-k flips" when those alone stay within noise], [why_not: not
        visible]}], "first_flagged": name | None, "fastest_growth": {name, from, by_u} | None}.
        A point one path lacks has None metrics.

    Raises:
        ValueError: the two paths' outputs of a point do not align (`divergence`).
    """
    u = unit_roundoff(precision)
    m = mask.bool()
    gap = logp_gap.double()[m]
    unseen = dict(unseen or {})
    flipped: dict[str, torch.Tensor] = {}  # MoE block name -> [N, T] tokens whose top-k set differs
    rows = []
    for p in points:
        name, what = p[0], p[1]
        if name not in onepass:
            rows.append({"name": name, "what": what, "visible": False, "flagged": False,
                         "why_not": unseen.get(name, "the trainer's model has no such point"),
                         **dict.fromkeys(("rel_norm", "rel_max", "rel_norm_u", "rel_max_u", "noise_ref_u", "ratio",
                                          "corr_logp_gap"))})
            continue
        d = (divergences or {}).get(name) or divergence(decode[name], onepass[name], mask)
        ref = None if noise_ref is None else noise_ref.get(name)

        def above(rel: float, finite: bool, ref=ref) -> bool:
            if not finite or not math.isfinite(rel):
                return True
            if ref is None:
                return rel / u > noise
            return rel > NOISE_RATIO * ref if ref > 0 else rel > 0
        row = {"name": name, "what": what, "visible": True, "rel_norm": d["rel_norm"], "rel_max": d["rel_max"],
               "rel_norm_u": d["rel_norm"] / u, "rel_max_u": d["rel_max"] / u,
               "noise_ref_u": None if ref is None else ref / u,
               "ratio": None if not ref else d["rel_norm"] / ref,
               "flagged": above(d["rel_norm"], d["finite"]),
               "corr_logp_gap": _corr(d["per_token"], gap)}
        if f"{name}:topk" in decode and f"{name}:topk" in onepass:  # MoE router: own top-k of each path
            flip = (decode[f"{name}:topk"] != onepass[f"{name}:topk"]).any(-1) & m  # [N, T]
            row["topk_flip_rate"] = float(flip[m].double().mean()) if m.any() else 0.0
            flipped[name.rsplit(".", 1)[0]] = flip
        elif name in flipped and bool(flipped[name].any()):  # the MoE block of a router with flips
            rest = divergence(decode[name], onepass[name], m & ~flipped[name])
            row["rel_norm_u_unflipped"] = rest["rel_norm"] / u
            if row["flagged"] and not above(rest["rel_norm"], rest["finite"]):
                row["flag_cause"] = "top-k flips"
        rows.append(row)
    first = next((r["name"] for r in rows if r["flagged"]), None)
    # growth along the residual stream: each block output against its input (the previous block's; 0 before)
    stream = [r for r in rows if r["name"].count(".") == 1 and r["name"].startswith("layers.") and r["visible"]]
    growth, prev = None, {"name": "embeddings", "rel_norm_u": 0.0}
    for r in stream:
        by = r["rel_norm_u"] - prev["rel_norm_u"]
        if growth is None or by > growth["by_u"]:
            growth = {"name": r["name"], "from": prev["name"], "by_u": by}
        prev = r
    return {"u": u, "noise_u": noise, "noise_ratio": None if noise_ref is None else NOISE_RATIO, "layers": rows,
            "first_flagged": first, "fastest_growth": growth}


def replay(engine: Any, trainer: Any, batch: RolloutBatch, precision: str, temperature: float,
           reference: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Replay `batch` through both paths of one precision and compare them (see module doc).

    MoE with R3 (`trainer.router_replay == "rollout"`): the one-pass path is routed to the experts
    the decode path's routers just picked (this precision's µ), as a run would route it.

    Args:
        engine: the rollout engine in this precision (`decode_path`).
        trainer: the policy in this precision (`onepass_path`).
        batch: the fixed responses, sampled once for all precisions.
        precision: the preset name ("fp16", "bf16", "fp32"), for u and the noise level.
        temperature: the sampling temperature.
        reference: the `outputs` of an fp32 `replay` of the same batch ({"decode", "onepass"}:
            name -> `[N, T, W]`): each point's rounding reference `noise_ref` (module doc); None:
            the bare `noise_u`.

    Returns:
        `compare(...)`'s dict plus `logp` {decode, onepass} (`[N, T]` fp32 tensors), `logp_gap`
        {mean, max} of |log µ − log π| over valid tokens, `r3` (whether R3 routed the trainer) and
        `outputs` ({"decode", "onepass"}: name -> `[N, T, W]`; an fp32 run's are the next precisions'
        `reference`; callers drop it before writing JSON).

    Raises:
        ValueError: the two paths' outputs do not align (`divergence`).
    """
    from nemo_rl_fp16.modeling.moe_routing import EXPERT_DTYPE, PAD_EXPERT

    dec, logp_roll = decode_path(engine, batch, temperature)
    mask = batch.response_mask.bool()
    routers = [p.name for p in probe_points(engine.model) if p.ids is not None]
    r3 = bool(routers) and getattr(trainer, "router_replay", "none") == "rollout"
    if r3:
        experts = torch.stack([dec[f"{n}:topk"] for n in routers], 2).to(EXPERT_DTYPE)  # [N, T, layers, k]
        batch = dataclasses.replace(batch, rollout_experts=experts.masked_fill(~mask[:, :, None, None], PAD_EXPERT))
    one, logp_train = onepass_path(trainer, batch, temperature)
    gap = (logp_roll.double() - logp_train.double()).abs().masked_fill(~mask, 0.0)
    divs, noise_ref = _divergences(dec, one, mask, reference)
    out = compare(dec, one, mask, probe_points(engine.model), precision, gap, noise_u(precision, engine.model),
                  unseen=probes(trainer.compute)[1], noise_ref=noise_ref, divergences=divs)
    out["logp"] = {"decode": logp_roll.masked_fill(~mask, 0.0), "onepass": logp_train.masked_fill(~mask, 0.0)}
    valid = gap[mask]
    out["logp_gap"] = {"mean": float(valid.mean()) if valid.numel() else 0.0,
                       "max": float(valid.max()) if valid.numel() else 0.0}
    out["r3"] = r3
    out["outputs"] = {"decode": dec, "onepass": one}
    return out


def _divergences(dec: dict[str, torch.Tensor], one: dict[str, torch.Tensor], mask: torch.Tensor,
                 reference: dict[str, dict[str, torch.Tensor]] | None,
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, float] | None]:
    """`divergence(dec, one)` per point on both paths, and its rounding reference (module doc).

    The reference is min(rel(dec, ref_dec), rel(one, ref_one)) when `reference` is given; each
    output is cast to float64 once. `mask` is the `[N, T]` bool response mask.
    """
    divs: dict[str, dict[str, Any]] = {}
    noise_ref = None if reference is None else {}
    for n in one:
        if n.endswith(":topk") or n not in dec:
            continue
        _check_aligned(dec[n], one[n], mask)
        a64, b64 = dec[n][mask].double(), one[n][mask].double()
        divs[n] = _divergence64(a64, b64)
        if reference is not None and n in reference["decode"] and n in reference["onepass"]:
            ref_a, ref_b = reference["decode"][n], reference["onepass"][n]
            _check_aligned(dec[n], ref_a, mask)
            _check_aligned(one[n], ref_b, mask)
            noise_ref[n] = min(_divergence64(a64, ref_a[mask].double(), full=False)["rel_norm"],
                               _divergence64(b64, ref_b[mask].double(), full=False)["rel_norm"])
    return divs, noise_ref


@contextmanager
def planted_fault(model: torch.nn.Module, param: str, scale: float = 1.0 + 1e-2) -> Iterator[None]:
    """Scale the parameter named `param` of `model` by `scale`, in its own dtype; restored on exit.

    A fault to read in the report (tests, `run_doctor(plant=...)`): e.g. the rollout engine's
    `model.layers.1.input_layernorm.weight`.

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


#: what the doctor cannot see through vLLM (one line, in the report)
VLLM_UNSEEN = ("vLLM runs the model inside its own worker, which exposes no per-layer hook here: per-layer "
               "divergence, router logits and top-k flips are not visible; compared: the engine's own log µ of its "
               "samples vs the trainer's log π of the same tokens (rerun with rollout.backend=torch for the layers)")


def logprob_only(engine: Any, trainer: Any, prompts: list[list[int]], params: Any, precision: str,
                 temperature: float) -> tuple[dict[str, Any], RolloutBatch]:
    """What the doctor can compare through an engine it cannot hook (vLLM): sample, then score.

    The engine samples `prompts` (its own log µ, `batch.rollout_logp`); the policy scores the same
    tokens (`logprobs`, log π).

    Args:
        engine: a rollout engine with `generate` (vLLM's; no model to hook).
        trainer: the policy in this precision.
        prompts: token ids per prompt.
        params: the sampling settings (`interfaces.SamplingParams`).
        precision: the preset name, for u.
        temperature: the sampling temperature log π is taken at.

    Returns:
        (a `replay`-shaped dict with no layers — `layers` [], `first_flagged` None, `unseen`
        `VLLM_UNSEEN`, `logp` {decode: the engine's own `rollout_logp`, onepass: the trainer's
        log π}, `logp_gap`, `samples` {rows, tokens} — , the engine's batch).
    """
    batch = engine.generate(prompts, params)
    mask = batch.response_mask.bool()
    logp_roll = batch.rollout_logp.float().cpu()
    logp_train = trainer.logprobs(batch, temperature).float().cpu()
    gap = (logp_roll.double() - logp_train.double()).abs().masked_fill(~mask, 0.0)[mask]
    return {"u": unit_roundoff(precision), "noise_u": None, "noise_ratio": None, "layers": [], "first_flagged": None,
            "fastest_growth": None, "unseen": VLLM_UNSEEN, "r3": False,
            "logp": {"decode": logp_roll.masked_fill(~mask, 0.0), "onepass": logp_train.masked_fill(~mask, 0.0)},
            "logp_gap": {"mean": float(gap.mean()) if gap.numel() else 0.0,
                         "max": float(gap.max()) if gap.numel() else 0.0},
            "samples": {"rows": batch.num_samples, "tokens": int(mask.sum())}}, batch
