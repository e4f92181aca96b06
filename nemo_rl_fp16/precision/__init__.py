"""Precision: the dtype contract of a run and what enforces it.

- `policy`: `PrecisionPolicy` (every dtype of one side), presets, the one dtype table, validation.
- `loss_scale`: `LossScaleConfig` and `DynamicLossScaler` (fp16 dynamic loss scaling).
- `audit`: `audit_model` / `check_model`, a live model's dtypes against a policy.
- `range_monitor`: `ActivationMonitor`, the fp16 range (headroom) of activations per layer.
- `cpu_numerics`: the package-defined fp16/bf16 kernels on CPU (rollout decode vs trainer prefill).

The first three are re-exported here; `range_monitor` and `cpu_numerics` are imported by path
(they depend on `modeling` / install a torch function mode).
"""

from nemo_rl_fp16.precision.audit import audit_model, check_model, is_router_param
from nemo_rl_fp16.precision.loss_scale import DynamicLossScaler, LossScaleConfig
from nemo_rl_fp16.precision.policy import (
    DTYPE_NAMES,
    DTYPES,
    FP16_MAX,
    PRESET_OF,
    PRESETS,
    ROUTER_COMPONENTS,
    PrecisionMismatchError,
    PrecisionPolicy,
    as_dict,
    dtype_name,
    get_dtype,
    precision_problems,
    resolve_policies,
    unit_roundoff,
)

__all__ = [
    "DTYPES", "DTYPE_NAMES", "FP16_MAX", "PRESETS", "PRESET_OF", "ROUTER_COMPONENTS", "DynamicLossScaler", "LossScaleConfig",
    "PrecisionMismatchError", "PrecisionPolicy", "as_dict", "audit_model", "check_model", "dtype_name", "get_dtype",
    "is_router_param", "precision_problems", "resolve_policies", "unit_roundoff",
]
