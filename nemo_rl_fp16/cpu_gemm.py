"""Fast, numerically honest fp16 and bf16 GEMMs on CPUs without native low-precision arithmetic.

torch's CPU fp16 and bf16 matmuls fall back to slow kernels on CPUs without AMX-FP16 (fp16) or
AVX512-BF16/AMX (bf16). On this project's CI CPU (AMD EPYC, `get_cpu_capability()` == "AVX2",
no AVX512-BF16) both are ~10x slower than an fp32 GEMM of the same size (benchmarks/cpu_gemm.py,
1 thread, tiny-Qwen2 fwd+bwd: fp32 249 ms, bf16 2525 ms, fp16 2919 ms; shared/PLATFORM.md).
Yet both kernels already accumulate in fp32 and round the result once: measured against an fp64
evaluation over the same low-precision values, torch's native fp16 and bf16 GEMMs (forward and
backward) are within 0.5 ulp at the tensor's scale, i.e. correctly rounded fp32 sums. An fp32 GEMM
over the same values with the result rounded to fp16/bf16 therefore has the same numerics — and
they are also the semantics of a GPU fp16/bf16 tensor-core GEMM (low precision in, fp32
accumulate, low precision out), which is what arXiv 2510.26788's runs use. Measured against
native (tests/unit/test_cpu_gemm.py): single GEMMs within 0.5 fp16 ulp / 0.125 bf16 ulp (bf16
mostly bitwise identical), a whole tiny Qwen2's logits within 0.62 fp16 / 0.5 bf16 ulp.

`lowp_gemm_as_fp32(dtype)` (dtype fp16 or bf16) is a scoped `TorchFunctionMode` that reroutes the
GEMM functions (`F.linear`, `matmul`/`@`, `mm`, `bmm`, `addmm`, `baddbmm`) when *every* floating
tensor argument is `dtype` on CPU. Everything else (elementwise ops, norms, softmax, attention,
other dtypes) stays native. TorchFunctionMode does not see autograd's backward kernels, so with
grad enabled the rerouted op runs inside a custom `autograd.Function` whose backward also runs
in fp32 and rounds the input gradients to `dtype`: gradients keep low-precision semantics (they
accumulate into fp16/bf16 `.grad` exactly as natively).

Attention is left native by default, on purpose, for both dtypes. torch's CPU fp16 and bf16 flash
kernels, like GPU FlashAttention, round the softmax probabilities P to the low precision before
the P @ V product; an fp32 reroute would not, making attention more precise than any fp16/bf16
engine's. Measured on a tiny Qwen2 (tests/unit/rollout, 4 seeds), trainer-vs-rollout KL k3:
fp16 native 1.9e-7-2.6e-7, GEMM reroute 0.98-1.09x native, GEMM+attention reroute 0.02-0.16x;
bf16 native 5.6e-6-8.6e-6, GEMM reroute 0.95-1.01x native, GEMM+attention reroute 0 to 2e-8
(< 0.004x: on this model attention rounding is nearly all of the bf16 mismatch). Rerouting
attention would understate exactly the mismatch this package studies. Native attention is not
the bottleneck (benchmarks/cpu_gemm.py, 1 thread, fwd+bwd: GEMM reroute alone takes bf16 from
2525 to 308 ms and fp16 from 2919 to 352 ms). `lowp_gemm_as_fp32(dtype, attention=True)`
reroutes SDPA too, for speed-only uses.

Engines enter it via `maybe_lowp_gemm_as_fp32(device, dtype)`, active only when
`should_emulate_cpu_gemm`: a CPU device, dtype fp16 or bf16, and no native support
(`cpu_has_native`). Never on GPUs; `NEMO_RL_NATIVE_CPU_GEMM=1` turns it off everywhere (A/B checks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

NATIVE_ENV = "NEMO_RL_NATIVE_CPU_GEMM"
LOWP_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

_GEMM_FUNCS: frozenset[Callable] = frozenset({
    F.linear,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm,
    torch.bmm, torch.Tensor.bmm,
    torch.addmm, torch.Tensor.addmm,
    torch.baddbmm, torch.Tensor.baddbmm,
})
_ATTENTION_FUNCS: frozenset[Callable] = frozenset({F.scaled_dot_product_attention})


def _cpu_flag(name: str) -> bool:
    try:
        return bool(getattr(torch.cpu, name)())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


def cpu_has_native(dtype: torch.dtype) -> bool:
    """True when this CPU has fast `dtype` GEMMs, where torch's own kernel is fine.

    fp16: AMX-FP16. bf16: AVX512-BF16 or AMX tiles (AMX-BF16). Other dtypes (fp32, fp64) have no
    emulation here, so their native kernel is by definition the one to use: True.
    """
    if dtype == torch.float16:
        return _cpu_flag("_is_amx_fp16_supported")
    if dtype == torch.bfloat16:
        return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")
    return True


def should_emulate_cpu_gemm(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether to reroute `dtype` GEMMs through fp32: CPU, fp16 or bf16, no native support, and
    `NEMO_RL_NATIVE_CPU_GEMM` unset (or "0").

    Never for CUDA (tensor cores already do low-precision-in/fp32-accumulate).
    """
    if torch.device(device).type != "cpu" or dtype not in LOWP_DTYPES:
        return False
    if os.environ.get(NATIVE_ENV, "0") not in ("", "0"):
        return False
    return not cpu_has_native(dtype)


def _eligible(args: tuple, kwargs: dict, dtype: torch.dtype) -> bool:
    """All floating tensor arguments are `dtype` on CPU (and there is at least one), no `out=`."""
    if kwargs.get("out") is not None:
        return False
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    floats = [t for t in tensors if t.is_floating_point()]
    return bool(floats) and all(t.dtype == dtype and t.device.type == "cpu" for t in floats)


def _upcast(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return x


class _Fp32GemmFunction(torch.autograd.Function):
    """Runs `call` in fp32 on upcast low-precision inputs; forward and backward results rounded
    to `dtype`.

    The fp32 graph built in forward is kept on `ctx` and differentiated in backward, so the
    backward GEMMs (dX = dY W, dW = dY^T X) are fp32 GEMMs over `dtype` values rounded to `dtype`,
    like a GPU's fp16/bf16 backward, without recomputing the forward.
    """

    @staticmethod
    def forward(ctx, call, dtype, *leaves):  # type: ignore[override]
        leaves32, inputs32 = list(leaves), []
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                leaves32[i] = t.detach().float().requires_grad_(ctx.needs_input_grad[2 + i])
                if leaves32[i].requires_grad:
                    inputs32.append((i, leaves32[i]))
        with torch.enable_grad():
            out32 = call(*leaves32)
        ctx.out32, ctx.inputs32, ctx.n_leaves, ctx.dtype = out32, inputs32, len(leaves), dtype
        return out32.detach().to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.out32 is None:
            raise RuntimeError("lowp_gemm_as_fp32: a second backward through the same graph "
                               "(retain_graph=True) is not supported")
        grads: list[torch.Tensor | None] = [None] * ctx.n_leaves
        if ctx.inputs32:
            idx, inputs = zip(*ctx.inputs32, strict=True)
            g32 = torch.autograd.grad(ctx.out32, inputs, grad_out.float(), allow_unused=True)
            for i, g in zip(idx, g32, strict=True):
                grads[i] = None if g is None else g.to(ctx.dtype)
        ctx.out32 = ctx.inputs32 = None  # free the fp32 graph now, not when the node dies
        return (None, None, *grads)


def _run_fp32(func: Callable, args: tuple, kwargs: dict, dtype: torch.dtype) -> Any:
    """`func` over upcast inputs, result rounded to `dtype`; with autograd through
    `_Fp32GemmFunction` when needed."""
    flat, spec = tree_flatten((args, kwargs))
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)):
        a32, k32 = tree_map(_upcast, (args, kwargs))
        out = func(*a32, **k32)
        return out.to(dtype) if isinstance(out, torch.Tensor) and out.dtype == torch.float32 else out

    def call(*leaves: Any) -> Any:
        a, k = tree_unflatten(list(leaves), spec)
        return func(*a, **k)

    return _Fp32GemmFunction.apply(call, dtype, *flat)


class LowpGemmAsFp32Mode(TorchFunctionMode):
    """TorchFunctionMode rerouting `dtype` (fp16 or bf16) CPU GEMMs to fp32 GEMMs rounded to
    `dtype` (module doc)."""

    def __init__(self, dtype: torch.dtype, attention: bool = False):
        super().__init__()
        if dtype not in LOWP_DTYPES:
            raise ValueError(f"lowp_gemm_as_fp32: dtype must be one of {LOWP_DTYPES}, got {dtype}")
        self.dtype = dtype
        self.funcs = _GEMM_FUNCS | _ATTENTION_FUNCS if attention else _GEMM_FUNCS

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.funcs and _eligible(args, kwargs, self.dtype):
            return _run_fp32(func, args, kwargs, self.dtype)
        return func(*args, **kwargs)


@contextlib.contextmanager
def lowp_gemm_as_fp32(dtype: torch.dtype, attention: bool = False) -> Iterator[None]:
    """Scope in which `dtype` (fp16 or bf16) CPU GEMMs, forward and backward, run as fp32 GEMMs
    rounded to `dtype`. Calls on other dtypes (or mixed dtypes) are left to torch.

    `attention=True` also reroutes `scaled_dot_product_attention` (faster, but more precise than
    low-precision attention kernels: see the module doc for why the engines leave it off).
    """
    with LowpGemmAsFp32Mode(dtype, attention):
        yield


def maybe_lowp_gemm_as_fp32(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """`lowp_gemm_as_fp32(dtype)` when `should_emulate_cpu_gemm(device, dtype)`, else a no-op."""
    return lowp_gemm_as_fp32(dtype) if should_emulate_cpu_gemm(device, dtype) else contextlib.nullcontext()
