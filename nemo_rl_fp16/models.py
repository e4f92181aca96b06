"""Model helpers shared by the torch trainer and the torch rollout engine.

Both engines build the model, position it, and turn logits into token log-probs through these
functions, so that the only difference between π (trainer) and µ (rollout engine) is the one
under study: precision (and, for µ, the KV-cached incremental forward).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from nemo_rl_fp16.precision import FP16_MAX, _as_dict

#: HF attention kernel for both engines. Measured on the CI CPUs (tiny Qwen2, 128 x 24 tokens):
#: "sdpa" is 3-5x faster than "eager" in fp32/bf16 and is what vLLM-like engines fuse anyway.
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


def build_model(
    model_cfg: Mapping[str, Any] | Any,
    dtype: torch.dtype,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> PreTrainedModel:
    """An HF causal LM from a recipe's `model:` block, parameters cast to `dtype`, in eval mode.

    `model_cfg` holds either `config` (a dict with `model_type` and config kwargs: a randomly
    initialised model; with `seed` the init uses its own RNG seeded by it, so that both engines
    built from one config start identical, without it the global torch RNG) or `name_or_path` (a local checkpoint directory or a cached hub id; never
    downloaded). The model is built in fp32 and its parameters are then rounded to `dtype` once,
    so every engine holds the same rounding of the same weights. Floating buffers (RoPE inverse
    frequencies) stay fp32, as in vLLM/Megatron. Dropout is off (eval mode) on both sides so that
    π and µ are the same function up to precision.
    """
    cfg = _as_dict(model_cfg)
    attn = cfg.get("attn_implementation") or DEFAULT_ATTN_IMPLEMENTATION
    trust = bool(cfg.get("trust_remote_code", False))
    path, config = cfg.get("name_or_path"), cfg.get("config")
    if (path is None) == (config is None):
        raise ValueError("model config needs exactly one of `name_or_path` (local checkpoint) or "
                         f"`config` (dict with model_type), got keys {sorted(k for k, v in cfg.items() if v is not None)}")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if config is not None:
            kw = _as_dict(config)
            if "model_type" not in kw:
                raise ValueError(f"model.config needs a `model_type` (e.g. qwen2), got keys {sorted(kw)}")
            hf_config = AutoConfig.for_model(kw.pop("model_type"), **kw)
            model = AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=attn, dtype=torch.float32, trust_remote_code=trust)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(path), attn_implementation=attn, dtype=torch.float32,
                    local_files_only=True, trust_remote_code=trust)
            except OSError as e:
                where = "directory exists but" if os.path.isdir(str(path)) else "no such directory and"
                raise FileNotFoundError(
                    f"cannot load model {path!r}: {where} no loadable local checkpoint "
                    f"(local_files_only=True; nothing is downloaded): {e}") from e
    return cast_params_(model, dtype).to(device).eval()


def cast_params_(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Round every parameter to `dtype` in place (tied weights stay tied); buffers keep theirs."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.config.dtype = dtype
    return model


def load_weights_(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place, casting to each tensor's dtype and device.

    Validates everything first (unknown names, missing names, shape mismatches are reported
    together) so that a bad state dict leaves the model untouched, never half-written.
    """
    own = model.state_dict()
    unknown = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict))
    shapes = [f"{k}: got {tuple(v.shape)}, model has {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = []
    for what, names in (("unknown names", unknown), ("missing names", missing), ("shape mismatches", shapes)):
        if names:
            more = f" ... (+{len(names) - 20} more)" if len(names) > 20 else ""
            problems.append(f"{what} ({len(names)}): {', '.join(names[:20])}{more}")
    if problems:
        raise ValueError("state dict does not match the model; nothing was copied:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in state_dict.items():
            own[k].copy_(v)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`cumsum(mask) - 1` clamped at 0: a left-padded row is positioned as if unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def effective_temperature(temperature: float) -> float:
    """The temperature log-probs use: greedy decoding (0) is scored at temperature 1."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return 1.0 if temperature == 0 else float(temperature)


def logprob_table(logits: torch.Tensor, temperature: float,
                  logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log softmax(logits / T) over the vocabulary, in `logits_dtype` (fp32), from low-precision logits.

    The cast happens before the temperature division, identically in both engines; greedy
    decoding (T = 0) is scored at T = 1.
    """
    return torch.log_softmax(logits.to(logits_dtype) / effective_temperature(temperature), dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`logprob_table(...)[token]`: the log-prob of each given token."""
    return logprob_table(logits, temperature, logits_dtype).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_width(input_ids: torch.Tensor, prompt_width: int) -> int:
    """T, the response width of a `[N, P + T]` batch (checked: P >= 1, T >= 1)."""
    n_resp = input_ids.shape[1] - prompt_width
    if prompt_width < 1 or n_resp < 1:
        raise ValueError(f"need prompt_width >= 1 and a response, got P={prompt_width}, width {input_ids.shape[1]}")
    return n_resp


def response_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_width: int, temperature: float,
                      logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[N, T]` log-probs of the response tokens from one full-sequence forward (the trainer's π).

    Token `P + t` is predicted by the logits at position `P + t - 1`; only those T positions
    reach the lm_head (`logits_to_keep`). Padding is not zeroed: callers honour response_mask.
    """
    n_resp = response_width(input_ids, prompt_width)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                logits_to_keep=n_resp + 1)
    return token_logprobs(out.logits[:, :-1], input_ids[:, prompt_width:], temperature, logits_dtype)


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of `model.forward` (`cache` since transformers 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer stack of an HF causal LM (`model.model.layers` for Llama/Qwen)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"cannot find decoder layers on {type(model).__name__}")
    return layers


class ActivationMonitor:
    """fp16 headroom monitor: running max |hidden state| output of each decoder layer.

    Use as a context manager around forwards; `metrics()` reports the per-layer maxima, the
    overall max, the headroom factor `65504 / max` (below ~10 a fp16 overflow is near) and the
    count of non-finite outputs; any non-finite output makes the headroom 0 ("unsafe"). Values are kept as tensors until `metrics()` to avoid a device
    sync per layer.
    """

    def __init__(self, model: torch.nn.Module):
        self.layers = decoder_layers(model)
        self.max_abs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.nonfinite: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list[Any] = []

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            h = (output[0] if isinstance(output, (tuple, list)) else output).detach()
            m, bad = h.abs().amax().float(), (~torch.isfinite(h)).sum()
            self.max_abs[i] = m if self.max_abs[i] is None else torch.maximum(self.max_abs[i], m)
            self.nonfinite[i] = bad if self.nonfinite[i] is None else self.nonfinite[i] + bad
        return hook

    def __enter__(self) -> ActivationMonitor:
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def metrics(self, prefix: str = "range/") -> dict[str, float]:
        """Flat float metrics; empty when no forward ran inside the monitor."""
        seen = [(i, m.item()) for i, m in enumerate(self.max_abs) if m is not None]
        if not seen:
            return {}
        out = {f"{prefix}act_absmax/layer{i}": v for i, v in seen}
        nonfinite = float(sum(n.item() for n in self.nonfinite if n is not None))
        top = max((v for _, v in seen), key=lambda v: math.inf if v != v else v)  # a NaN max counts as inf
        out[f"{prefix}act_absmax"] = top
        # any non-finite activation: headroom 0 ("unsafe"), never inf/NaN from 65504 / NaN
        safe = nonfinite == 0 and math.isfinite(top)
        out[f"{prefix}fp16_headroom"] = (FP16_MAX / top if top > 0 else float("inf")) if safe else 0.0
        out[f"{prefix}act_nonfinite"] = nonfinite
        return out
