"""Package-defined fp16/bf16 numerics for the CPU engines: the same bits on every x86-64 CPU.

Why this exists. The product measures KL(µ‖π) between a rollout engine and a trainer. On a GPU
the two differ because they run different kernels (vLLM's decode kernels vs the trainer's
prefill/training kernels), and every low-precision rounding inside them is fixed by those
kernels. On a CPU, torch's fp16/bf16 ops follow the host BLAS: on an AVX-512 CPU the fp32 sums of
a one-row decode GEMM and of a whole-sequence GEMM come out identical (bf16 then rounds the same
on both sides: KL exactly 0 on most steps), on an AVX2 CPU they differ in the last bits (measured:
the demo's bf16/fp16 KL ratio was 2.8x on one, 40x on the other). A figure that depends on the
host is no evidence. Inside `cpu_numerics(device, dtype)` the package itself defines every
rounding of the low-precision forward, and the rollout engine and the trainer differ the way a
real inference engine and a real trainer differ, explicitly:

======================  ===========================================  ==============================
op                      trainer and rollout prefill (`"prefill"`)    rollout decode (`"decode"`)
======================  ===========================================  ==============================
GEMM (linear, matmul)   tensor-core tile GEMM (cuBLAS/CUTLASS): the  cuBLAS split-K: K in
                        dot product over all of K and the bias,      `SPLIT_K` contiguous slices,
                        rounded once to fp16/bf16 (the fp32          each slice's sum rounded to
                        accumulator's ~2^-24 error is modelled as    fp32, the partial sums and the
                        exact: it is far below fp16/bf16's ulp)      bias added in fp32, rounded
                                                                     once to fp16/bf16
attention (SDPA)        FlashAttention-2 forward: keys in blocks of  FlashAttention split-KV decode
                        `ATTN_BLOCK_N` from the first real key,      (vLLM's decode path): keys in
                        online softmax (running max/sum in fp32),    splits of `KV_SPLIT`, softmax
                        P = exp(S - m) rounded to fp16/bf16 before   per split, P rounded against
                        P·V, fp32 accumulator, output O / l rounded  the split's own max, split
                        once                                          outputs and LSEs combined in
                                                                     fp32, output rounded once
======================  ===========================================  ==============================

Each dot product (a GEMM's K slice, Q·Kᵀ and P·V over one head) is evaluated in fp64: the
products of two fp16 or bf16 values are exact there, and their sum is exact unless the products
span more than ~2^31 in magnitude, so the result does not depend on the BLAS's summation order.
Every fp32 accumulation step is an elementwise IEEE addition in a fixed order. The
transcendental and reduction ops of the forward (exp, softmax, log-softmax, SiLU/GELU, rsqrt,
mean, cos, sin) are evaluated in fp64 and rounded once to their input dtype, so the vector width
of the host's fp32 kernels (8 lanes on AVX2, 16 on AVX-512) does not leak in. Where the package
cannot make the bits ISA-independent: an fp64 sum whose terms span more than ~2^31 (or an fp64
transcendental) may differ in its last fp64 bit between hosts, which changes the rounded result
only when it lies within 2^-29 relative of a rounding boundary; and the backward pass and the
optimizer, which do not enter the π-vs-µ comparison, run torch's fp32 kernels (see
`tests/unit/precision/test_cpu_kernels.py` for what is asserted bitwise).

The kernels themselves live in `precision.cpu_kernels`; this module holds the switches, the host
detection, the numerics record and `PackageNumericsMode`, which routes torch's ops to them
(the kernels and the geometry constants are re-exported here).

The geometry (`SPLIT_K` 2, `ATTN_BLOCK_N` 64, `KV_SPLIT` 16) is scaled to the
tiny CPU models' widths and 60-100-token sequences, so that each path's blocking actually splits
their dot products the way a GPU kernel's does at production sizes (FlashAttention-2: 64-128 key
blocks over thousands of keys). Backward (trainer only): the gradient of the exact op, computed
by an fp32 GEMM / fp32 attention over the same low-precision values, rounded to fp16/bf16 — as
FlashAttention's backward recomputes attention instead of differentiating its forward's roundings.

Switches (environment, read at every scope entry):
- `NEMO_RL_CPU_KERNELS=package` (default) | `native`: `native` uses the host's own torch kernels
  (the A/B check; on CPUs without fast fp16/bf16 GEMMs the GEMMs then run as fp32 rounded once,
  for speed, as before this module existed).
- `NEMO_RL_CPU_ISA=auto` (default) | `avx2` | `avx512` | `avx512_bf16` | `amx`: overrides the
  package's detection of the host (`cpu_isa`), used by `native` mode and recorded in reports.
  Together with `MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`
  (set before torch is imported) it makes an AVX-512 host behave as an AVX2 one:
  `scripts/cpu_variant.sh avx2 <command>`.

Never active on GPUs (their kernels are the real thing) or for fp32 (the control).
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from nemo_rl_fp16.precision.cpu_kernels import (
    ATTN_BLOCK_N,
    KERNELS_ENV,
    KV_SPLIT,
    SPLIT_K,
    Profile,
    _sdpa,
    kernel_profile,
    package_addmm,
    package_attention,
    package_gemm,
    package_grouped_mm,
    package_linear,
    package_matmul,
)

ISA_ENV = "NEMO_RL_CPU_ISA"
KERNEL_MODES = ("package", "native")
ISA_CHOICES = ("auto", "avx2", "avx512", "avx512_bf16", "amx")
LOWP_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

__all__ = [
    "ATTN_BLOCK_N", "ISA_CHOICES", "ISA_ENV", "KERNELS_ENV", "KERNEL_MODES", "KV_SPLIT", "LOWP_DTYPES", "SPLIT_K",
    "PackageNumericsMode", "Profile", "cpu_has_native", "cpu_isa", "cpu_numerics", "kernel_mode", "kernel_profile",
    "numerics_record", "package_addmm", "package_attention", "package_gemm", "package_grouped_mm", "package_linear",
    "package_matmul", "uses_package_kernels",
]


# ---------------------------------------------------------------------------------------------
# switches and the numerics record
# ---------------------------------------------------------------------------------------------
def kernel_mode() -> str:
    """The CPU kernel mode from `NEMO_RL_CPU_KERNELS` (read on every call).

    Returns:
        "package" (default: unset or empty) or "native".

    Raises:
        ValueError: another value; the message names the variable and the choices.
    """
    mode = os.environ.get(KERNELS_ENV, "package").strip().lower() or "package"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r} is not one of {', '.join(KERNEL_MODES)}; unset it "
                         "for the package's CPU kernels or set 'native' for the host's")
    return mode


def _cpu_flag(name: str) -> bool:
    try:
        return bool(getattr(torch.cpu, name)())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


def cpu_isa() -> str:
    """The host's vector ISA class as the package sees it: avx2 | avx512 | avx512_bf16 | amx.

    `NEMO_RL_CPU_ISA` overrides the detection (torch's own `_is_*_supported` flags ignore
    `ATEN_CPU_CAPABILITY`, so they cannot be steered otherwise).

    Returns:
        The forced value, or the detected class: "amx" (AMX tiles), "avx512_bf16", "avx512" (from
        ATen's CPU capability), else "avx2".

    Raises:
        ValueError: `NEMO_RL_CPU_ISA` is not one of `ISA_CHOICES`.
    """
    forced = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if forced not in ISA_CHOICES:
        raise ValueError(f"{ISA_ENV}={forced!r} is not one of {', '.join(ISA_CHOICES)}")
    if forced != "auto":
        return forced
    if _cpu_flag("_is_amx_tile_supported"):
        return "amx"
    if _cpu_flag("_is_avx512_bf16_supported"):
        return "avx512_bf16"
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return "avx512" if "avx512" in cap else "avx2"


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether the host (as `cpu_isa` sees it) has fast `dtype` GEMMs.

    bf16: AVX512-BF16 or AMX; fp16: AMX (AMX-FP16); True for fp32/fp64 (nothing to emulate).

    Args:
        dtype: the GEMM dtype.

    Returns:
        True when torch's native kernels for `dtype` are fast on this host.

    Raises:
        ValueError: a bad `NEMO_RL_CPU_ISA` (`cpu_isa`).
    """
    isa = cpu_isa()
    if dtype == torch.float16:
        return isa == "amx" and _cpu_flag("_is_amx_fp16_supported")
    if dtype == torch.bfloat16:
        return isa in ("avx512_bf16", "amx")
    return True


def uses_package_kernels(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when `cpu_numerics(device, dtype)` installs the package kernels.

    That is: a CPU device, fp16 or bf16, and `NEMO_RL_CPU_KERNELS` not `native`.

    Args:
        device: the engine's device.
        dtype: the engine's weight dtype.

    Returns:
        Whether the package kernels are active for that engine.

    Raises:
        ValueError: a bad `NEMO_RL_CPU_KERNELS` (read only for CPU fp16/bf16).
    """
    return torch.device(device).type == "cpu" and dtype in LOWP_DTYPES and kernel_mode() == "package"


def numerics_record(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What decides the low-precision numerics of a run on `device`, for reports.

    Args:
        device: the run's device.

    Returns:
        {"torch": version, "cpu": platform processor string, "isa": `cpu_isa()`,
        "aten_capability": ATen's CPU capability, "kernels": "package" | "native" ("cuda" on a
        GPU), "kernel_geometry": {"SPLIT_K", "ATTN_BLOCK_N", "KV_SPLIT"}, "blas_caps": the
        `MKL_ENABLE_INSTRUCTIONS` / `ONEDNN_MAX_CPU_ISA` / `ATEN_CPU_CAPABILITY` variables that are
        set}.

    Raises:
        ValueError: a bad `NEMO_RL_CPU_ISA` or (on CPU) `NEMO_RL_CPU_KERNELS`.
    """
    dev = torch.device(device)
    caps = {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
            if k in os.environ}
    return {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "isa": cpu_isa(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": "cuda" if dev.type == "cuda" else kernel_mode(),
        "kernel_geometry": {"SPLIT_K": SPLIT_K, "ATTN_BLOCK_N": ATTN_BLOCK_N, "KV_SPLIT": KV_SPLIT},
        "blas_caps": caps,
    }


# ---------------------------------------------------------------------------------------------
# the mode
# ---------------------------------------------------------------------------------------------
def _via_fp64(func):
    """Evaluate `func` on fp64 copies of its floating tensor args, round back to the input dtype."""
    def run(*args, **kwargs):
        src = next(a for a in args if isinstance(a, torch.Tensor))
        out_dtype = kwargs.pop("dtype", None) or src.dtype
        a64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return func(*a64, **kwargs).to(out_dtype)
    return run


_FP64_FUNCS = {
    F.silu, F.gelu, torch.exp, torch.Tensor.exp, torch.rsqrt, torch.Tensor.rsqrt,
    torch.mean, torch.Tensor.mean, torch.cos, torch.Tensor.cos, torch.sin, torch.Tensor.sin,
    torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax,
}
_LINEAR_FUNCS = {F.linear}
_MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
                 torch.bmm, torch.Tensor.bmm}
_SDPA_FUNCS = {F.scaled_dot_product_attention}
_ADDMM_FUNCS = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm}
# MoE expert GEMMs (transformers' `grouped_mm` experts implementation)
_GROUPED_MM_FUNCS = {f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f is not None}


def _floats(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    vals = list(args) + list(kwargs.values())
    return [t for t in vals if isinstance(t, torch.Tensor) and t.is_floating_point()]


class PackageNumericsMode(TorchFunctionMode):
    """TorchFunctionMode installing the package kernels for `dtype` (fp16 or bf16) CPU tensors.

    GEMMs and SDPA whose floating arguments are all `dtype` go to the package GEMM/attention;
    the fp64-evaluated ops (module doc) apply to `dtype` and fp32 CPU tensors. `addmm`/`baddbmm`
    (megatron's local attention) run as the package GEMM with an fp32 epilogue; MoE expert GEMMs
    (`grouped_mm`) as one package GEMM per expert. Anything else (other dtypes, CUDA tensors,
    `out=`) is left to torch. Inside the mode, attention dropout raises ValueError and unsupported
    `grouped_mm` layouts raise NotImplementedError rather than falling back to the host's kernels.

    Args:
        dtype: torch.float16 or torch.bfloat16.

    Raises:
        ValueError: another dtype.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        if dtype not in LOWP_DTYPES:
            raise ValueError(f"package CPU kernels are for fp16/bf16, got {dtype}")
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("out") is not None:
            return func(*args, **kwargs)
        floats = _floats(args, kwargs)
        cpu = bool(floats) and all(t.device.type == "cpu" for t in floats)
        if cpu and all(t.dtype == self.dtype for t in floats):
            if func in _LINEAR_FUNCS:
                return package_linear(*args, **kwargs)
            if func in _MATMUL_FUNCS:
                return package_matmul(*args)
            if func in _SDPA_FUNCS:
                return _sdpa(*args, **kwargs)
            if func in _ADDMM_FUNCS:
                return package_addmm(*args, **kwargs)
            if func in _GROUPED_MM_FUNCS:
                return package_grouped_mm(*args, **kwargs)
        if cpu and func in _FP64_FUNCS and all(t.dtype in (self.dtype, torch.float32) for t in floats):
            return _via_fp64(func)(*args, **kwargs)
        return func(*args, **kwargs)


class _NativeFastGemmMode(TorchFunctionMode):
    """`native` mode on CPUs without fast `dtype` GEMMs.

    GEMMs run as fp32 over the same values, rounded once (torch's slow native kernels have the
    same numerics, ~10x slower).
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        floats = _floats(args, kwargs)
        if (func in _LINEAR_FUNCS | _MATMUL_FUNCS and kwargs.get("out") is None and floats
                and all(t.dtype == self.dtype and t.device.type == "cpu" for t in floats)):
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kup = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                   for k, v in kwargs.items()}
            return func(*up, **kup).to(self.dtype)
        return func(*args, **kwargs)


def cpu_numerics(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The numerics scope the engines enter around every forward/backward.

    Package kernels (module doc) for fp16/bf16 on CPU; in `native` mode, torch's kernels (with
    the fp32-GEMM speed path where the host lacks fast `dtype` GEMMs); a no-op on GPUs and for
    fp32.

    Args:
        device: the engine's device.
        dtype: the engine's weight dtype (`param_dtype`).

    Returns:
        A context manager: `PackageNumericsMode(dtype)`, the native fp32-GEMM mode, or
        `contextlib.nullcontext()`.

    Raises:
        ValueError: a bad `NEMO_RL_CPU_KERNELS` / `NEMO_RL_CPU_ISA` (read only for CPU fp16/bf16).
    """
    if torch.device(device).type != "cpu" or dtype not in LOWP_DTYPES:
        return contextlib.nullcontext()
    if kernel_mode() == "package":
        return PackageNumericsMode(dtype)
    return contextlib.nullcontext() if cpu_has_native(dtype) else _NativeFastGemmMode(dtype)
