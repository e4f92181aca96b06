"""fp16 preflight: will this model overflow or underflow in fp16, before the run spends a step?

`nemo-rl-fp16 preflight recipe=...`, and automatically at the start of an fp16 run
(`precision.preflight: warn | refuse | off`, default warn). On a few sample prompts (the recipe's
data, `PREFLIGHT_PROMPTS` of them, responses sampled from the fp32 model, at most
`PREFLIGHT_MAX_NEW_TOKENS` tokens) it measures, in fp32 (so that values beyond fp16's range show
as such instead of as inf):

- per decoder layer, the largest |activation| over the layer and every submodule inside it
  (q/k/v/o, gate/up/down projections, norms, activation function), plus the embeddings, final
  norm and logits, against fp16's largest finite value 65504: headroom in bits
  = log2(65504 / max). A layer is *at risk* below `HEADROOM_MIN_BITS`; a non-finite activation has
  no headroom (reported as non-finite, never as safe).
- the gradient of a GRPO-like surrogate loss (advantages ±1 alternating by row, token mean over the
  recipe's global batch of `data.prompts_per_step x rollout.num_generations` responses, scaled to
  one micro-batch), per parameter element: the fraction of nonzero elements whose scaled value
  |g| x S falls below 2^-24 (fp16's smallest subnormal: they underflow to 0) or above 65504
  (overflow: the scaler backs off) at the configured `precision.loss_scale.initial_scale` S, and a
  recommended initial scale: the largest power of two leaving one bit of headroom over the largest
  gradient, 2^floor(log2(65504 / 2 / max|g|)).

Unsafe = a layer at risk or a non-finite activation, or more than `UNDERFLOW_MAX_FRAC` of gradient
elements underflowing at the initial scale. `refuse` then stops the run (exit 2) with one line
naming the layer and what to change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from nemo_rl_fp16.config import ConfigError
from nemo_rl_fp16.modeling import cache_kwarg, decoder_layers, position_ids_from_mask, token_logprobs
from nemo_rl_fp16.precision import FP16_MAX

FP16_SMALLEST_SUBNORMAL = 2.0**-24
HEADROOM_MIN_BITS = 3.0       # at risk above 65504 / 8 = 8188: a few sample prompts do not show the worst token
UNDERFLOW_MAX_FRAC = 1e-3     # more than 0.1% of gradient elements flushed to zero at the initial scale
PREFLIGHT_PROMPTS = 4
PREFLIGHT_MAX_NEW_TOKENS = 32
MODES = ("warn", "refuse", "off")


def headroom_bits(max_abs: float) -> float:
    """fp16 headroom of an activation maximum, in bits: log2(65504 / max_abs).

    Args:
        max_abs: the largest |activation| measured (fp32).

    Returns:
        The headroom in bits (negative: beyond fp16's range); +inf for 0, -inf for a non-finite
        max (never "safe").
    """
    if not math.isfinite(max_abs):
        return -math.inf
    return math.inf if max_abs == 0 else math.log2(FP16_MAX / max_abs)


def _groups(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(report name, module) whose outputs (and their submodules') are measured, in forward order."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = [("embeddings", inner.embed_tokens)] if hasattr(inner, "embed_tokens") else []
    out += [(f"layers.{i}", layer) for i, layer in enumerate(decoder_layers(model))]
    if isinstance(getattr(inner, "norm", None), torch.nn.Module):
        out.append(("norm", inner.norm))
    if model.get_output_embeddings() is not None:
        out.append(("logits", model.get_output_embeddings()))
    return out


def activation_ranges(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[dict]:
    """Largest |activation| per layer over one no-grad forward of `model` (fp32) on a batch.

    Args:
        model: an HF causal LM (its dtype is used as is; fp32 shows values beyond fp16's range).
        input_ids: `[N, L]` int64 token ids (left-padded).
        attention_mask: `[N, L]`, 1 on real tokens; padding positions are excluded.

    Returns:
        [{layer, max_abs, where (the submodule holding the max), nonfinite (count),
        headroom_bits}] in forward order.
    """
    keep = attention_mask.bool()
    stats: dict[str, dict[str, Any]] = {}
    handles = []

    def hook(group: str, sub: str):
        def fn(_m, _i, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() < 2:
                return
            h = h.detach()
            if tuple(h.shape[:2]) == tuple(keep.shape):
                h = h[keep]
            bad = int((~torch.isfinite(h)).sum())
            m = float(h.abs().max()) if h.numel() else 0.0
            s = stats.setdefault(group, {"max_abs": 0.0, "where": sub, "nonfinite": 0})
            s["nonfinite"] += bad
            if bad or m > s["max_abs"] or not math.isfinite(m):
                s["max_abs"], s["where"] = (math.inf if bad else m), sub
        return fn

    for group, module in _groups(model):
        for sub, m in module.named_modules():
            handles.append(m.register_forward_hook(hook(group, f"{group}.{sub}" if sub else group)))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [{"layer": g, **stats[g], "headroom_bits": headroom_bits(stats[g]["max_abs"])}
            for g, _ in _groups(model) if g in stats]


def sample_responses(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     pad_token_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sample one response per prompt from `model` (KV cache, temperature 1, fp32 logits).

    Args:
        model: the HF causal LM to sample from (fp32 for the preflight).
        prompts: token ids per prompt (lengths may differ; left-padded to the longest).
        max_new_tokens: response length cap.
        pad_token_id: fills the left padding and the positions after a response ended.
        seed: seeds the sampler's `torch.Generator` (same seed, same responses).

    Returns:
        (`[N, P+T]` int64 input ids, `[N, P+T]` int64 attention mask (0 on left padding and after
        a response ends), P the prompt width). Responses stop at the model's `eos_token_id` (if
        any), and sampling stops early at non-finite logits.
    """
    from nemo_rl_fp16.rollout.torch_engine import sample_tokens

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        attn[i, width - len(p):] = 1
    eos = model.config.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    cache, kw = DynamicCache(config=model.config), cache_kwarg(model)
    alive = torch.ones(len(prompts), dtype=torch.bool)
    step_ids = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)[:, -step_ids.shape[1]:],
                        use_cache=True, logits_to_keep=1, **{kw: cache})
            if not bool(torch.isfinite(out.logits).all()):
                break  # the activation pass reports the non-finite values; sample no further
            tok, _ = sample_tokens(out.logits[:, -1], 1.0, 1.0, gen)
            tok = torch.where(alive, tok, pad_token_id)
            ids, attn = torch.cat([ids, tok[:, None]], 1), torch.cat([attn, alive.long()[:, None]], 1)
            if eos is not None:
                alive = alive & ~torch.isin(tok, torch.tensor(eos if isinstance(eos, list) else [eos]))
            if not alive.any():
                break
            step_ids = tok[:, None]
    return ids, attn, width


def gradient_underflow(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_width: int, *, initial_scale: float, global_tokens: float, micro_rows: int) -> dict:
    """Fractions of gradient elements that under/overflow fp16 at `initial_scale` (see module doc).

    The surrogate loss is −Σ A_i log π(token) / `global_tokens` x `micro_rows` / N with A_i = ±1
    alternating by row (a GRPO-like token-mean loss scaled to one micro-batch); the gradient is
    taken in `model`'s dtype (fp32) and left zeroed after. Underflow: |g| x S < 2^-24 (fp16's
    smallest subnormal); overflow: |g| x S > 65504. Only nonzero gradient elements count.

    Args:
        model: the HF causal LM (fp32); its `.grad` fields are set to None on return.
        input_ids: `[N, P+T]` token ids from `sample_responses`.
        attention_mask: `[N, P+T]` mask from `sample_responses`.
        prompt_width: P.
        initial_scale: the loss scale S the run starts with.
        global_tokens: response tokens per optimizer step (the token-mean's denominator).
        micro_rows: rows per micro-batch.

    Returns:
        {max_abs, underflow_frac, overflow_frac, recommended_scale (2^floor(log2(65504 / 2 /
        max_abs)); `initial_scale` when max_abs is 0 or non-finite), underflow_frac_at_recommended,
        worst_layer (the parameter group with the largest underflow fraction), worst_layer_frac,
        n_elements (nonzero gradient elements)}.
    """
    model.zero_grad(set_to_none=True)
    n = input_ids.shape[0]
    with torch.enable_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        logp = token_logprobs(out.logits[:, prompt_width - 1:-1], input_ids[:, prompt_width:], 1.0)
        mask = attention_mask[:, prompt_width:].to(logp.dtype)
        adv = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(n)], dtype=logp.dtype)[:, None]
        loss = -(adv * logp * mask).sum() / global_tokens * (micro_rows / n)
        loss.backward()
    per_layer: dict[str, list[int]] = {}
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().abs().flatten()
        g = g[g != 0]
        grads.append(g)
        layer = _layer_of(name)
        tot = per_layer.setdefault(layer, [0, 0])
        tot[0] += int((g * initial_scale < FP16_SMALLEST_SUBNORMAL).sum())
        tot[1] += g.numel()
    model.zero_grad(set_to_none=True)
    g = torch.cat(grads) if grads else torch.zeros(0)
    if not g.numel():
        return {"max_abs": 0.0, "underflow_frac": 0.0, "overflow_frac": 0.0, "recommended_scale": initial_scale,
                "underflow_frac_at_recommended": 0.0, "worst_layer": None, "worst_layer_frac": 0.0, "n_elements": 0}
    gmax = float(g.max())
    rec = 2.0 ** math.floor(math.log2(FP16_MAX / 2 / gmax)) if math.isfinite(gmax) and gmax > 0 else initial_scale
    worst = max(per_layer, key=lambda k: per_layer[k][0] / per_layer[k][1])
    return {"max_abs": gmax, "underflow_frac": float((g * initial_scale < FP16_SMALLEST_SUBNORMAL).double().mean()),
            "overflow_frac": float((g * initial_scale > FP16_MAX).double().mean()), "recommended_scale": rec,
            "underflow_frac_at_recommended": float((g * rec < FP16_SMALLEST_SUBNORMAL).double().mean()),
            "worst_layer": worst, "worst_layer_frac": per_layer[worst][0] / per_layer[worst][1], "n_elements": g.numel()}


def preflight(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, pad_token_id: int, initial_scale: float,
              global_tokens_per_response: float | None = None, global_rows: int, micro_rows: int,
              max_new_tokens: int, seed: int) -> dict:
    """Run the preflight on an fp32 HF model: activation headroom and gradient underflow in fp16.

    `problems` are one-line findings (layer first); `safe` is True when there are none.
    Thresholds: `HEADROOM_MIN_BITS` per layer, `UNDERFLOW_MAX_FRAC` of gradient elements.

    Args:
        model: fp32 HF causal LM (the trainer's master weights, or a copy).
        prompts: token ids of the sample prompts.
        pad_token_id: fills the prompts' left padding and finished responses.
        initial_scale: the loss scale the run starts with.
        global_tokens_per_response: expected response length (default: the samples' mean length).
        global_rows: responses per optimizer step (prompts_per_step x num_generations).
        micro_rows: rows per micro-batch (policy.micro_batch_size, at most global_rows).
        max_new_tokens: response length cap of the sampled responses.
        seed: seeds the sampling of the responses.

    Returns:
        {"layers": `activation_ranges` rows, "gradients": `gradient_underflow` dict, "problems":
        [str], "safe": bool, "initial_scale": float, "samples": {"rows", "mean_response_tokens"}}.
    """
    ids, attn, width = sample_responses(model, prompts, max_new_tokens, pad_token_id, seed)
    layers = activation_ranges(model, ids, attn)
    resp_len = float(attn[:, width:].sum()) / ids.shape[0]
    tokens = global_rows * (global_tokens_per_response or max(resp_len, 1.0))
    grads = gradient_underflow(model, ids, attn, width, initial_scale=initial_scale, global_tokens=tokens,
                               micro_rows=min(micro_rows, global_rows))
    problems = []
    for r in layers:
        if r["nonfinite"]:
            problems.append(f"{r['layer']}: non-finite activation in {r['where']} (no fp16 headroom)")
        elif r["headroom_bits"] < HEADROOM_MIN_BITS:
            problems.append(f"{r['layer']}: max |activation| {r['max_abs']:.3g} in {r['where']}, fp16 headroom "
                            f"{r['headroom_bits']:.1f} bits (< {HEADROOM_MIN_BITS:g}; 65504 is fp16's largest)")
    if grads["underflow_frac"] > UNDERFLOW_MAX_FRAC:
        problems.append(f"{grads['worst_layer']}: {grads['underflow_frac']:.1%} of gradient elements underflow fp16 "
                        f"(< 2^-24) at initial loss scale {initial_scale:g} ({grads['worst_layer_frac']:.1%} in this "
                        f"layer); recommended initial scale {grads['recommended_scale']:g}")
    return {"layers": layers, "gradients": grads, "problems": problems, "safe": not problems,
            "initial_scale": initial_scale, "samples": {"rows": int(ids.shape[0]), "mean_response_tokens": resp_len}}


def fix_hint(result: dict) -> str:
    """What to change for the first problem of an unsafe `preflight` result (one clause).

    Args:
        result: a `preflight` result with at least one problem.

    Returns:
        "set precision.loss_scale.initial_scale=<recommended>" for gradient underflow, else the
        advice to run in bf16 or rescale the layer's weights.
    """
    first = result["problems"][0]
    if "underflow" in first:
        return f"set precision.loss_scale.initial_scale={result['gradients']['recommended_scale']:g}"
    return "run this model in bf16 (precision=bf16), or rescale the layer's weights"


def summary_line(result: dict) -> str:
    """One line: the tightest headroom, gradient underflow at the initial scale, verdict.

    Args:
        result: a `preflight` result (with at least one layer row).

    Returns:
        "preflight (fp16): min activation headroom ... : ok" or "...: UNSAFE: <first problem>;
        <fix_hint>".
    """
    finite = [r for r in result["layers"] if math.isfinite(r["headroom_bits"])]
    worst = min(result["layers"], key=lambda r: r["headroom_bits"])
    head = ("non-finite" if not math.isfinite(worst["headroom_bits"]) else f"{worst['headroom_bits']:.1f} bits") \
        if finite or result["layers"] else "n/a"
    g = result["gradients"]
    verdict = "ok" if result["safe"] else f"UNSAFE: {result['problems'][0]}; {fix_hint(result)}"
    return (f"preflight (fp16): min activation headroom {head} ({worst['layer']}); gradient underflow "
            f"{g['underflow_frac']:.2%} at initial scale {result['initial_scale']:g} (recommended "
            f"{g['recommended_scale']:g}): {verdict}")


def check_mode(mode: str) -> str:
    """Validate `precision.preflight`.

    Args:
        mode: the key's value.

    Returns:
        `mode`, one of `MODES` ("warn", "refuse", "off").

    Raises:
        ConfigError: any other value (one line naming the key and the allowed values).
    """
    if mode not in MODES:
        raise ConfigError(f"bad value for 'precision.preflight': {mode}; allowed: {', '.join(MODES)}")
    return mode


def _layer_of(name: str) -> str:
    m = re.search(r"layers\.(\d+)", name)
    return f"layers.{m.group(1)}" if m else name.rsplit(".", 1)[0]


def _run_settings(rc: Any, initial_scale: float) -> dict:
    return {"initial_scale": initial_scale, "global_rows": rc.data.prompts_per_step * rc.rollout.num_generations,
            "micro_rows": rc.policy.micro_batch_size, "max_new_tokens": min(rc.rollout.max_new_tokens,
                                                                           PREFLIGHT_MAX_NEW_TOKENS), "seed": rc.seed}


def at_run_start(rc: Any, setup: Any, console: Any) -> dict | None:
    """The automatic preflight of an fp16 run (`precision.preflight`), on the trainer's current weights.

    Runs when the trainer's `param_dtype` is float16 and the mode is not `off`, on the torch
    trainer's fp32 master model (no copy), at the scaler's current loss scale. `warn` prints
    `summary_line` (or that the check was skipped, for an unsupported trainer).

    Args:
        rc: the typed recipe (`config.typed`).
        setup: the assembled run, `build.RunSetup` (reads `train_policy`, `policy`, `prompt_ids`,
            `tokenizer`).
        console: a rich `Console` for the summary line.

    Returns:
        The `preflight` result, or None when it did not run (mode off, not fp16, or an
        unsupported trainer under `warn`).

    Raises:
        ConfigError: `precision.preflight` is invalid; or, under `refuse`, the model is unsafe in
            fp16 (one line: the layer, the finding and what to change) or the trainer cannot be
            checked (Megatron, Ray actors, FSDP: not supported yet). The CLI exits 2.
    """
    mode = check_mode(rc.precision.preflight)
    if mode == "off" or setup.train_policy.param_dtype != torch.float16:
        return None
    policy = setup.policy
    master = getattr(policy, "master", None)
    # the megatron master (`MegatronCausalLM`) is not an HF model: the preflight cannot sample from it yet
    if not isinstance(master, torch.nn.Module) or getattr(policy, "_fsdp", False) or rc.policy.backend == "megatron":
        why = f"policy.backend={rc.policy.backend}" + (" under Ray" if rc.cluster.ray.enabled else "") + \
            (" with FSDP" if getattr(policy, "_fsdp", False) else "")
        if mode == "refuse":
            raise ConfigError(f"precision.preflight=refuse: the fp16 preflight does not support {why} yet (it needs the "
                              "torch trainer's master model in this process); set precision.preflight=warn or off")
        console.print(f"preflight (fp16): skipped ({why} is not supported yet)", highlight=False)
        return None
    scale = policy.scaler.scale if getattr(policy, "scaler", None) is not None else 1.0
    result = preflight(master, setup.prompt_ids[:PREFLIGHT_PROMPTS], pad_token_id=setup.tokenizer.pad_token_id,
                       **_run_settings(rc, scale))
    if not result["safe"] and mode == "refuse":
        raise ConfigError(f"precision.preflight=refuse: fp16 is unsafe for this model: {result['problems'][0]}; "
                          f"{fix_hint(result)} (or precision.preflight=warn to run anyway)")
    console.print(summary_line(result), highlight=False, soft_wrap=True)
    return result


def run_preflight(cfg: Any, console: Any = None) -> int:
    """`nemo-rl-fp16 preflight`: the fp16 preflight of a recipe's starting weights.

    Builds the recipe's tokenizer, data and initial weights (the SFT warm start where configured)
    in an fp32 model, runs `preflight` at `precision.loss_scale.initial_scale`, prints the
    per-layer table and the summary line, and writes `<output_dir>/preflight/report.json`
    (non-finite numbers as null).

    Args:
        cfg: the loaded recipe (`config.load_recipe`).
        console: where the table goes (default: a new rich `Console`).

    Returns:
        0 (the exit code) when the check ran, safe or (under `warn`/`off`) not.

    Raises:
        ConfigError: `precision.preflight` is invalid, or the model is unsafe and
            `precision.preflight=refuse` (one line with the fix; the CLI exits 2). The report is
            written first.
    """
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from nemo_rl_fp16.assembly import build_tokenizer, initial_weights
    from nemo_rl_fp16.config import typed
    from nemo_rl_fp16.data import get_dataset
    from nemo_rl_fp16.fsutil import atomic_write
    from nemo_rl_fp16.modeling import build_model, load_weights_
    from nemo_rl_fp16.precision import LossScaleConfig
    from nemo_rl_fp16.runtime import torch_threads

    console = console or Console()
    rc = typed(cfg)
    mode = check_mode(rc.precision.preflight)
    tok = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    init = initial_weights(rc, tok, problems, console)
    with torch_threads(1):
        model = build_model(rc.model.model_dump(), torch.float32, seed=rc.seed)
        if init is not None:
            load_weights_(model, init)
        prompts = [tok(p.prompt)["input_ids"] for p in problems[:PREFLIGHT_PROMPTS]]
        scale = rc.precision.loss_scale.initial_scale or LossScaleConfig().initial_scale
        result = preflight(model, prompts, pad_token_id=tok.pad_token_id, **_run_settings(rc, scale))
    table = Table(title=f"fp16 preflight: {rc.recipe}")
    for col in ("layer", "max |activation|", "where", "headroom (bits)"):
        table.add_column(col)
    for r in result["layers"]:
        table.add_row(r["layer"], f"{r['max_abs']:.3g}", r["where"],
                      "non-finite" if r["nonfinite"] else f"{r['headroom_bits']:.1f}")
    console.print(table)
    out = Path(rc.output_dir) / "preflight" / "report.json"
    safe_json = json.dumps(result, indent=2, default=str, allow_nan=True).replace("-Infinity", "null") \
        .replace("Infinity", "null").replace("NaN", "null")
    atomic_write(out, safe_json + "\n")
    if not result["safe"] and mode == "refuse":
        raise ConfigError(f"precision.preflight=refuse: fp16 is unsafe for this model: {result['problems'][0]}; "
                          f"{fix_hint(result)} (or precision.preflight=warn to run anyway)")
    console.print(summary_line(result), highlight=False, soft_wrap=True)
    console.print(f"report: {out}")
    return 0
