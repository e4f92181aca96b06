"""Fast, numerically honest fp16 GEMMs on CPUs without native fp16 arithmetic.

torch's CPU fp16 matmul falls back to a slow kernel on CPUs without AVX512-FP16/AMX-FP16
(~12x slower than an fp32 GEMM of the same size, see shared/PLATFORM.md), yet it already
accumulates in fp32 and rounds the result to fp16 once. An fp32 GEMM over the same fp16 values
with the result rounded to fp16 therefore has the same numerics — and they are also the
semantics of a GPU fp16 tensor-core GEMM (fp16 in, fp32 accumulate, fp16 out), which is what
arXiv 2510.26788's fp16 runs use. Measured against native fp16: identical to within one fp16
ulp (tests/unit/test_fp16_cpu.py).

`fp16_gemm_as_fp32()` is a scoped `TorchFunctionMode` that reroutes the GEMM functions
(`F.linear`, `matmul`/`@`, `mm`, `bmm`, `addmm`, `baddbmm`) when *every* floating tensor argument
is fp16 on CPU. Everything else (elementwise ops, norms, softmax, attention) stays native fp16. TorchFunctionMode does not see autograd's backward kernels, so with
grad enabled the rerouted op runs inside a custom `autograd.Function` whose backward also runs
in fp32 and rounds the input gradients to fp16: gradients keep fp16 semantics (fp16 grads
accumulate into fp16 `.grad` exactly as natively).

Attention is left native by default, on purpose. torch's CPU fp16 flash kernel, like GPU
FlashAttention, rounds the softmax probabilities P to fp16 before the P @ V product; an fp32
reroute would not, making attention more precise than any fp16 engine's. Measured on a tiny
Qwen2 (tests/unit/rollout): the rerouted attention shrinks the fp16 trainer-vs-rollout KL k3
~10x (2e-7 -> 2e-8), i.e. it would understate exactly the mismatch this package studies. Native
fp16 attention is not the bottleneck (benchmarks/fp16_cpu_gemm.py: GEMM reroute alone makes
fwd+bwd ~13x faster). `fp16_gemm_as_fp32(attention=True)` reroutes SDPA too, for speed-only uses.

Never used for bf16 (native bf16 is fast on these CPUs) nor on GPUs; `NEMO_RL_FP16_NATIVE_CPU=1`
turns it off everywhere (for A/B checks).
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

NATIVE_ENV = "NEMO_RL_FP16_NATIVE_CPU"

_GEMM_FUNCS: frozenset[Callable] = frozenset({
    F.linear,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm,
    torch.bmm, torch.Tensor.bmm,
    torch.addmm, torch.Tensor.addmm,
    torch.baddbmm, torch.Tensor.baddbmm,
})
_ATTENTION_FUNCS: frozenset[Callable] = frozenset({F.scaled_dot_product_attention})


def cpu_has_native_fp16() -> bool:
    """True when this CPU has fast fp16 GEMMs (AMX-FP16), where torch's own kernel is fine."""
    try:
        return bool(torch.cpu._is_amx_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


def should_use_fp16_cpu_gemm(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether to reroute fp16 GEMMs through fp32: CPU, float16, no native fp16, not disabled.

    Never for CUDA (tensor cores already do fp16-in/fp32-accumulate) and never for bf16.
    """
    if torch.device(device).type != "cpu" or dtype != torch.float16:
        return False
    if os.environ.get(NATIVE_ENV, "0") not in ("", "0"):
        return False
    return not cpu_has_native_fp16()


def _is_fp16_cpu(t: Any) -> bool:
    return t.dtype == torch.float16 and t.device.type == "cpu"


def _eligible(args: tuple, kwargs: dict) -> bool:
    """All floating tensor arguments are fp16 on CPU (and there is at least one), no `out=`."""
    if kwargs.get("out") is not None:
        return False
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    floats = [t for t in tensors if t.is_floating_point()]
    return bool(floats) and all(_is_fp16_cpu(t) for t in floats)


def _upcast(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return x


def _round(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x.to(torch.float16)
    return x


class _Fp32GemmFunction(torch.autograd.Function):
    """Runs `call` in fp32 on upcast fp16 inputs; forward and backward results rounded to fp16.

    The fp32 graph built in forward is kept on `ctx` and differentiated in backward, so the
    backward GEMMs (dX = dY W, dW = dY^T X) are fp32 GEMMs over fp16 values rounded to fp16,
    like a GPU's fp16 backward, without recomputing the forward.
    """

    @staticmethod
    def forward(ctx, call, *leaves):  # type: ignore[override]
        leaves32, inputs32 = list(leaves), []
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                leaves32[i] = t.detach().float().requires_grad_(ctx.needs_input_grad[1 + i])
                if leaves32[i].requires_grad:
                    inputs32.append((i, leaves32[i]))
        with torch.enable_grad():
            out32 = call(*leaves32)
        ctx.out32, ctx.inputs32, ctx.n_leaves = out32, inputs32, len(leaves)
        return out32.detach().to(torch.float16)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.out32 is None:
            raise RuntimeError("fp16_gemm_as_fp32: a second backward through the same graph "
                               "(retain_graph=True) is not supported")
        grads: list[torch.Tensor | None] = [None] * ctx.n_leaves
        if ctx.inputs32:
            idx, inputs = zip(*ctx.inputs32, strict=True)
            g32 = torch.autograd.grad(ctx.out32, inputs, grad_out.float(), allow_unused=True)
            for i, g in zip(idx, g32, strict=True):
                grads[i] = None if g is None else g.to(torch.float16)
        ctx.out32 = ctx.inputs32 = None  # free the fp32 graph now, not when the node dies
        return (None, *grads)


def _run_fp32(func: Callable, args: tuple, kwargs: dict) -> Any:
    """`func` over upcast inputs; with autograd through `_Fp32GemmFunction` when needed."""
    flat, spec = tree_flatten((args, kwargs))
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)):
        a32, k32 = tree_map(_upcast, (args, kwargs))
        return _round(func(*a32, **k32))

    def call(*leaves: Any) -> Any:
        a, k = tree_unflatten(list(leaves), spec)
        return func(*a, **k)

    return _Fp32GemmFunction.apply(call, *flat)


class Fp16GemmAsFp32Mode(TorchFunctionMode):
    """TorchFunctionMode rerouting fp16 CPU GEMMs to fp32 GEMMs rounded to fp16 (module doc)."""

    def __init__(self, attention: bool = False):
        super().__init__()
        self.funcs = _GEMM_FUNCS | _ATTENTION_FUNCS if attention else _GEMM_FUNCS

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.funcs and _eligible(args, kwargs):
            return _run_fp32(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fp16_gemm_as_fp32(attention: bool = False) -> Iterator[None]:
    """Scope in which fp16 CPU GEMMs (forward and backward) run as fp32 GEMMs rounded to fp16.

    `attention=True` also reroutes `scaled_dot_product_attention` (faster, but more precise than
    fp16 attention kernels: see the module doc for why the engines leave it off).
    """
    with Fp16GemmAsFp32Mode(attention):
        yield


def maybe_fp16_gemm_as_fp32(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """`fp16_gemm_as_fp32()` when `should_use_fp16_cpu_gemm(device, dtype)`, else a no-op."""
    return fp16_gemm_as_fp32() if should_use_fp16_cpu_gemm(device, dtype) else contextlib.nullcontext()
