"""HF causal LMs for both torch engines: build from a recipe's `model:` block, cast, load, find layers.

Both engines build the model through `build_model`, so that the only difference between π
(trainer) and µ (rollout engine) is the one under study: precision (and, for µ, the KV-cached
incremental forward).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from nemo_rl_fp16.precision.audit import is_router_param
from nemo_rl_fp16.precision.policy import as_dict

#: HF attention kernel for both engines. Measured on the CI CPUs (tiny Qwen2, 128 x 24 tokens):
#: "sdpa" is 3-5x faster than "eager" in fp32/bf16 and is what vLLM-like engines fuse anyway.
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


def build_model(
    model_cfg: Mapping[str, Any] | Any,
    dtype: torch.dtype,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    router_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """An HF causal LM from a recipe's `model:` block, parameters cast to `dtype`, in eval mode.

    `model_cfg` holds either `config` (a dict with `model_type` and config kwargs: a randomly
    initialised model; with `seed` the init uses its own RNG seeded by it, so that both engines
    built from one config start identical, without it the global torch RNG) or `name_or_path` (a local checkpoint directory or a cached hub id; never
    downloaded). The model is built in fp32 and its parameters are then rounded to `dtype` once,
    so every engine holds the same rounding of the same weights. Floating buffers (RoPE inverse
    frequencies) stay fp32, as in vLLM/Megatron. Dropout is off (eval mode) on both sides so that
    π and µ are the same function up to precision.

    Args:
        model_cfg: the `model:` block (mapping, OmegaConf or pydantic): `config` or
            `name_or_path`, optional `attn_implementation` (default "sdpa"), `trust_remote_code`.
        dtype: the parameter dtype (the policy's `param_dtype`, or fp32 for a master copy).
        seed: seeds the random init of a `config` model (None: the global torch RNG).
        device: where the model goes.
        router_dtype: MoE router/gate parameters' dtype (`cast_params_`; None: `dtype`).

    Returns:
        The model in eval mode, parameters in `dtype` (routers in `router_dtype`), floating buffers fp32.

    Raises:
        ValueError: not exactly one of `config` / `name_or_path`, or a `config` without `model_type`.
        FileNotFoundError: `name_or_path` is not a loadable local checkpoint.
    """
    cfg = as_dict(model_cfg)
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
            kw = as_dict(config)
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
    return cast_params_(model, dtype, router_dtype=router_dtype).to(device).eval()


def cast_params_(model: PreTrainedModel, dtype: torch.dtype, router_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Round every parameter to `dtype` in place (tied weights stay tied); buffers keep theirs.

    Args:
        model: an HF model.
        dtype: the target parameter dtype.
        router_dtype: the dtype of MoE router/gate parameters (`precision.is_router_param`), each
            cast once from its current value (None: `dtype`).

    Returns:
        `model` itself, with `config.dtype` set to `dtype`.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(router_dtype if router_dtype is not None and is_router_param(name) else dtype)
    model.config.dtype = dtype
    return model


def load_weights_(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place, casting to each tensor's dtype and device.

    Validates everything first (unknown names, missing names, shape mismatches are reported
    together) so that a bad state dict leaves the model untouched, never half-written.

    Args:
        model: the model to load into.
        state_dict: every name of `model.state_dict()`, any float dtype (cast on copy).

    Raises:
        ValueError: unknown or missing names, or shape mismatches; nothing was copied.
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


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of `model.forward`.

    Args:
        model: an HF causal LM.

    Returns:
        `"cache"` (transformers 5.2x) or `"past_key_values"` (earlier).
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer stack of an HF causal LM (`model.model.layers` for Llama/Qwen).

    Args:
        model: an HF causal LM (or anything with `get_decoder()` / `.model` holding `layers`).

    Returns:
        The `ModuleList` of decoder layers, in forward order.

    Raises:
        TypeError: no such stack.
    """
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"cannot find decoder layers on {type(model).__name__}")
    return layers
