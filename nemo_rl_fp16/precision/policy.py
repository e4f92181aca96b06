"""The precision contract: one `PrecisionPolicy` names every dtype of a run.

Trainer and rollout engine are both built from a policy, and `audit.audit_model` walks the real
modules afterwards so that a silently wrong dtype (a bf16 layer in an fp16 model, an MoE gate in
the wrong precision) is an error, not a slow drift of π away from µ. Why FP16 at all:
arXiv 2510.26788 — 10 mantissa bits keep the two engines within rounding noise where BF16's 7
do not; FP16's narrow range is handled by dynamic loss scaling and fp32 master weights.

This module holds the only string-to-dtype table of the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nemo_rl_fp16.precision.loss_scale import LossScaleConfig

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
PRESETS = ("fp16", "bf16", "fp32")
#: The preset name of each dtype (`float16` -> `fp16`), the short form reports and plans print.
PRESET_OF: dict[str, str] = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
FP16_MAX = 65504.0

# Module-path components that mark an MoE router / gate (HF Qwen2-MoE, Qwen3-MoE, Mixtral use
# `gate` and `shared_expert_gate`; megatron-core uses `router`). `gate_proj` is a dense MLP weight.
ROUTER_COMPONENTS = frozenset({"gate", "router", "shared_expert_gate"})



class PrecisionMismatchError(RuntimeError):
    """An engine's real dtypes disagree with the policy; the message lists every component.

    Args:
        component: what disagrees ("torch rollout engine", "precision.rollout", ...), the
            message's first words.
        problems: one line per finding; kept as the `problems` attribute.
        hint: the fix, the message's last line (default: build both engines from one preset, or
            declare the ablation with precision.rollout and precision.allow_mismatch=true).
    """

    def __init__(self, component: str, problems: Iterable[str], hint: str = ""):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        hint = hint or (
            "Build both engines from the same precision preset, or declare a deliberate "
            "ablation with precision.rollout=<preset> and precision.allow_mismatch=true."
        )
        super().__init__(f"{component} breaks the precision policy:\n{lines}\n{hint}")



def get_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (`float16`, `fp16`, `bf16`, ...) or dtype to a floating torch dtype.

    Args:
        name: a name of the one dtype table (`DTYPES`, case-insensitive, `torch.` prefix allowed)
            or a torch dtype.

    Returns:
        The torch dtype.

    Raises:
        ValueError: an unknown name or an unsupported dtype (the message lists the allowed ones).
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {name}; use one of {sorted(set(DTYPE_NAMES.values()))}")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(DTYPES)}")
    return DTYPES[key]


def unit_roundoff(dtype: str | torch.dtype) -> float:
    """Unit roundoff u = 2^-(mantissa bits + 1): fp16 2^-11, bf16 2^-8, fp32 2^-24.

    Args:
        dtype: a dtype, dtype name or preset name.

    Returns:
        u, half of `torch.finfo(dtype).eps`.
    """
    return torch.finfo(get_dtype(dtype)).eps / 2


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name (`float16`, `bfloat16`, `float32`) of a dtype.

    Args:
        dtype: any torch dtype.

    Returns:
        The table's name, or torch's name without the `torch.` prefix for other dtypes.
    """
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))



@dataclass(frozen=True)
class PrecisionPolicy:
    """Every dtype of one side (trainer or rollout) of a run.

    - `param_dtype`: weights the forward/backward runs on (FSDP `param_dtype`, Megatron fp16/bf16);
    - `compute_dtype`: activations and GEMM inputs;
    - `grad_reduce_dtype`: gradient all-reduce / accumulation;
    - `master_dtype`: master weights and optimizer state (fp32 always in presets);
    - `logits_dtype`: log-softmax over the vocabulary, the same on both sides;
    - `router_dtype`: MoE gate weights, gate logits and top-k selection;
    - `kv_cache_dtype`: the rollout engine's KV cache.
    """

    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    grad_reduce_dtype: torch.dtype
    master_dtype: torch.dtype
    logits_dtype: torch.dtype
    router_dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    loss_scale: LossScaleConfig

    @classmethod
    def from_name(cls, name: str) -> PrecisionPolicy:
        """A preset: `fp16` (with dynamic loss scaling), `bf16` or `fp32`.

        The router and KV cache follow the parameter dtype, which is what vLLM does by default;
        a recipe may set `router_dtype: float32` where both engines support it.

        Args:
            name: `fp16`, `bf16` or `fp32`.

        Returns:
            The preset: weights, compute, router and KV cache in the low dtype; master weights,
            gradient reduction and logits in fp32; loss scaling on for fp16 only.

        Raises:
            ValueError: another name.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown precision preset {name!r}; allowed: {list(PRESETS)}")
        low = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
        return cls(
            name=name,
            param_dtype=low,
            compute_dtype=low,
            grad_reduce_dtype=torch.float32,
            master_dtype=torch.float32,
            logits_dtype=torch.float32,
            router_dtype=low,
            kv_cache_dtype=low,
            loss_scale=LossScaleConfig(enabled=name == "fp16"),
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> PrecisionPolicy:
        """The trainer-side policy from a recipe's `precision:` block.

        Accepts a preset name, or a mapping with `name` plus optional dtype fields and a
        `loss_scale` mapping. The preset applies first, then every explicit (non-null) field. A
        null field takes its default from the *resolved* dtypes, not the preset's name:
        `compute_dtype`, `router_dtype` and `kv_cache_dtype` follow `param_dtype`, and
        `loss_scale.enabled` is on exactly when `param_dtype` is float16 (so
        `precision=bf16 precision.param_dtype=float16` gets a loss scaler).

        Args:
            cfg: a preset name, or the `precision:` block (mapping, OmegaConf or pydantic).

        Returns:
            The trainer-side policy.

        Raises:
            ValueError: an unknown preset or dtype name.
        """
        if isinstance(cfg, str):
            return cls.from_name(cfg)
        cfg = as_dict(cfg)
        base = cls.from_name(cfg.get("name") or "fp16")
        explicit = {f.name: get_dtype(cfg[f.name]) for f in dataclasses.fields(cls)
                    if f.name.endswith("_dtype") and cfg.get(f.name) is not None}
        param = explicit.get("param_dtype", base.param_dtype)
        follow = {k: param for k in ("compute_dtype", "router_dtype", "kv_cache_dtype")}
        ls_cfg = {k: v for k, v in as_dict(cfg.get("loss_scale") or {}).items() if v is not None}
        ls_cfg.setdefault("enabled", param == torch.float16)
        loss_scale = dataclasses.replace(base.loss_scale, **ls_cfg)
        return dataclasses.replace(base, **{**follow, **explicit}, loss_scale=loss_scale)

    def rollout_side(self, rollout_preset: str | None, explicit: Mapping[str, Any] | None = None) -> PrecisionPolicy:
        """The rollout engine's policy: this one, unless an ablation names another preset.

        An ablation preset replaces the weight dtype (`param_dtype`, and `compute_dtype` with it);
        every other explicit dtype key of the recipe (`explicit`: logits, router, KV cache, ...)
        applies to the rollout side as it does to the trainer's.

        Args:
            rollout_preset: `precision.rollout` (None: same as the trainer).
            explicit: the recipe's non-null `precision:` keys.

        Returns:
            `self`, or the ablation's rollout policy.
        """
        if rollout_preset in (None, self.name):
            return self
        keep = {k: v for k, v in (explicit or {}).items()
                if k.endswith("_dtype") and k not in ("param_dtype", "compute_dtype")}
        return PrecisionPolicy.from_config({"name": rollout_preset, **keep})

    def differences(self, other: PrecisionPolicy) -> list[str]:
        """Dtype fields on which two policies disagree, one line each (empty when they agree).

        `master_dtype` and `grad_reduce_dtype` (trainer-only) are not compared.

        Args:
            other: the rollout side's policy (`self` is the trainer's).

        Returns:
            Lines "<field>: trainer <dtype>, rollout <dtype>".
        """
        out = []
        for f in dataclasses.fields(self):
            if f.name.endswith("_dtype") and f.name not in ("master_dtype", "grad_reduce_dtype"):
                a, b = getattr(self, f.name), getattr(other, f.name)
                if a != b:
                    out.append(f"{f.name}: trainer {dtype_name(a)}, rollout {dtype_name(b)}")
        return out

    def describe(self) -> dict[str, str]:
        """Human-readable summary for plans, logs and reports.

        Returns:
            {"<field>_dtype": dtype name for every dtype field, "name": preset name, "loss_scale":
            "dynamic, initial ..., min ..., x<growth> after <n> clean steps, x<backoff> after <h>
            overflow(s)" or "off"}.
        """
        d = {f.name: dtype_name(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name.endswith("_dtype")}
        d["name"] = self.name
        ls = self.loss_scale
        d["loss_scale"] = (
            f"dynamic, initial {ls.initial_scale:g}, min {ls.min_scale:g}, x{ls.growth_factor:g} after "
            f"{ls.growth_interval} clean steps, x{ls.backoff_factor:g} after {ls.hysteresis} overflow(s)"
            if ls.enabled else "off"
        )
        return d

    def dtype_table(self, other: PrecisionPolicy) -> str:
        """Trainer (self) vs rollout (other) dtypes, one row per field, `!=` marking a difference.

        Args:
            other: the rollout side's policy.

        Returns:
            A multi-line text table (columns dtype, trainer, rollout; "-" in the rollout column of the
            trainer-only fields `master_dtype`, `grad_reduce_dtype`).
        """
        rows = [f"  {'dtype':<18}{'trainer':<10}rollout"]
        for f in dataclasses.fields(self):
            if f.name.endswith("_dtype"):
                a, b = dtype_name(getattr(self, f.name)), dtype_name(getattr(other, f.name))
                trainer_only = f.name in ("master_dtype", "grad_reduce_dtype")
                mark = "" if trainer_only or a == b else "   != MISMATCH"
                rows.append(f"  {f.name:<18}{a:<10}{'-' if trainer_only else b}{mark}")
        return "\n".join(rows)


def resolve_policies(cfg: Mapping[str, Any] | Any) -> tuple[PrecisionPolicy, PrecisionPolicy]:
    """(trainer, rollout) policies from a `precision:` block; refuses an undeclared mismatch.

    Args:
        cfg: the `precision:` block (mapping, OmegaConf, pydantic) or a preset name string.

    Returns:
        (trainer policy, rollout policy); the same object twice unless `precision.rollout` names
        another preset.

    Raises:
        PrecisionMismatchError: the two differ on a compared dtype field and
            `precision.allow_mismatch` is not true.
        ValueError: an unknown preset or dtype name.
        TypeError: `cfg` is not a mapping, config or preset name.
    """
    d = as_dict(cfg) if not isinstance(cfg, str) else {"name": cfg}
    train = PrecisionPolicy.from_config(d)
    rollout = train.rollout_side(d.get("rollout"), {k: v for k, v in d.items() if v is not None})
    diffs = train.differences(rollout)
    if diffs and not d.get("allow_mismatch", False):
        raise PrecisionMismatchError(
            "precision.rollout", diffs,
            "set precision.allow_mismatch=true to run this trainer/rollout ablation on purpose",
        )
    return train, rollout


def precision_problems(cfg: Mapping[str, Any], trainer: str = "torch", rollout: str = "torch") -> list[str]:
    """Dtype settings of a `precision:` block that an engine would not honour, one refusal line each.

    What each engine does: activations run in the weight dtype (no autocast), so `compute_dtype`
    must equal `param_dtype`; master weights and optimizer state are fp32; MoE gates run in the
    weight dtype, or in fp32 for `router_dtype=float32` (gate weights kept fp32, gate logits, softmax
    and top-k fp32: both torch engines, megatron's `moe_router_dtype='fp32'`; not the vLLM engine,
    whose build has no router-logits dtype setting), so `router_dtype` is `param_dtype` or float32; the KV cache
    is stored in the model dtype (HF DynamicCache, vLLM `kv_cache_dtype=auto`); vLLM's log-probs
    are fp32; megatron-core reduces gradients in fp32 or the weight dtype and its optimizer builds a
    loss scaler (`DynamicGradScaler`) for fp16 weights only, with growth 2.0 and backoff 0.5.

    Args:
        cfg: the `precision:` block (null keys: the preset's value).
        trainer: the trainer backend, `policy.backend` ("torch" | "megatron").
        rollout: the rollout backend, `rollout.backend` ("torch" | "vllm").

    Returns:
        Lines "bad value for 'precision.<key>': <value>; allowed: ...; <fix>"; empty when every
        setting is honoured.

    Raises:
        ValueError: an unknown preset or dtype name.
    """
    d = {k: v for k, v in as_dict(cfg).items() if v is not None}
    train = PrecisionPolicy.from_config(d)
    out: list[str] = []

    def bad(key: str, value: Any, allowed: str, fix: str) -> None:
        out.append(f"bad value for 'precision.{key}': {value}; allowed: {allowed}; {fix}")

    names = {k: dtype_name(getattr(train, k)) for k in ("param_dtype", "compute_dtype", "master_dtype")}
    if train.compute_dtype != train.param_dtype:
        bad("compute_dtype", names["compute_dtype"], f"null or = param_dtype ({names['param_dtype']})",
            "activations run in the weight dtype on both engines (no autocast); set compute_dtype=null "
            "or change param_dtype")
    if train.master_dtype != torch.float32:
        bad("master_dtype", names["master_dtype"], "null or float32",
            "master weights and optimizer state are fp32 (the low-precision copy is param_dtype)")
    grad_ok = {torch.float32, train.param_dtype} if trainer == "megatron" else set(DTYPE_NAMES)
    if train.grad_reduce_dtype not in grad_ok:
        bad("grad_reduce_dtype", dtype_name(train.grad_reduce_dtype),
            " or ".join(sorted(dtype_name(x) for x in grad_ok)),
            "megatron reduces gradients in fp32 or in the weight dtype")
    roll = train.rollout_side(d.get("rollout"), d)
    for side, pol, engine in (("trainer", train, trainer), ("rollout", roll, rollout)):
        if pol.router_dtype == pol.param_dtype or (pol.router_dtype == torch.float32 and engine != "vllm"):
            continue
        if pol.router_dtype == torch.float32:  # the vLLM engine
            bad("router_dtype", "float32", f"null or = the rollout's param_dtype ({dtype_name(pol.param_dtype)}) "
                "with rollout.backend=vllm", "this vLLM build (CPU 0.32) has no router-logits dtype setting: its "
                "MoE gates run in the weight dtype; set router_dtype=null or rollout.backend=torch")
        else:
            bad("router_dtype", dtype_name(pol.router_dtype), f"null, float32 or = the {side}'s param_dtype "
                f"({dtype_name(pol.param_dtype)})", "MoE gates run in the weight dtype or, for float32, in fp32; "
                "set router_dtype=null or float32")
        break
    if roll.kv_cache_dtype != roll.param_dtype:
        bad("kv_cache_dtype", dtype_name(roll.kv_cache_dtype), f"null or = the rollout's param_dtype "
            f"({dtype_name(roll.param_dtype)})", "both rollout engines keep the KV cache in the model dtype; "
            "set kv_cache_dtype=null")
    if rollout == "vllm" and roll.logits_dtype != torch.float32:
        bad("logits_dtype", dtype_name(roll.logits_dtype), "float32 with rollout.backend=vllm",
            "vLLM returns fp32 log-probs; set logits_dtype=null or rollout.backend=torch")
    if trainer == "megatron":
        ls = train.loss_scale
        if ls.enabled and train.param_dtype != torch.float16:
            bad("loss_scale.enabled", "true", f"null or false with param_dtype {names['param_dtype']} on "
                "policy.backend=megatron", "megatron's optimizer builds a loss scaler for fp16 weights only; "
                "use policy.backend=torch or loss_scale.enabled=null")
        for key, default in (("growth_factor", 2.0), ("backoff_factor", 0.5)):
            if getattr(ls, key) != default:
                bad(f"loss_scale.{key}", f"{getattr(ls, key):g}", f"null or {default:g} on policy.backend=megatron",
                    f"megatron's DynamicGradScaler hard-codes {key}={default:g}; set it to null or use "
                    f"policy.backend=torch")
    return out


def as_dict(cfg: Any) -> dict[str, Any]:
    """A `precision:` block as a plain dict, from a mapping, an OmegaConf config or a pydantic model.

    Args:
        cfg: a mapping, an OmegaConf config (interpolations resolved) or an object with
            `model_dump()`.

    Returns:
        A new top-level dict (nested values are not copied for a mapping).

    Raises:
        TypeError: anything else.
    """
    if isinstance(cfg, Mapping):
        return dict(cfg)
    try:  # OmegaConf DictConfig or a pydantic model, without importing either here
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump()
    raise TypeError(f"expected a mapping for the precision block, got {type(cfg).__name__}")
