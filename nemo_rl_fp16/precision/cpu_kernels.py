"""The package CPU kernels: tile GEMM and split-K, FlashAttention-2 forward and split-KV decode.

Each kernel's rounding semantics, the geometry (`SPLIT_K`, `ATTN_BLOCK_N`, `KV_SPLIT`) and why
they exist: `precision.cpu_numerics`, whose `PackageNumericsMode` routes torch's fp16/bf16 GEMMs
and attention here. `kernel_profile` picks the path: `"prefill"` (trainer, rollout prefill) or
`"decode"` (the rollout engine's one-token steps).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Literal

import torch

KERNELS_ENV = "NEMO_RL_CPU_KERNELS"  # `package` | `native` (`cpu_numerics.kernel_mode`); named in refusals
SPLIT_K = 2        # decode GEMMs: contiguous K slices reduced separately in fp32 (cuBLAS split-K)
ATTN_BLOCK_N = 64  # FlashAttention-2 forward key block
KV_SPLIT = 16      # decode attention: keys per split (FlashAttention split-KV / flash-decoding)

Profile = Literal["prefill", "decode"]
_PROFILE: contextvars.ContextVar[str] = contextvars.ContextVar("nemo_rl_cpu_profile", default="prefill")


@contextlib.contextmanager
def kernel_profile(profile: Profile) -> Iterator[None]:
    """Scope in which the package kernels run as `profile` (a context variable, so thread-safe).

    Args:
        profile: `"prefill"` (trainer, rollout prefill) or `"decode"` (the rollout engine's
            one-token steps).

    Yields:
        None; the previous profile is restored on exit.

    Raises:
        ValueError: another profile name.
    """
    if profile not in ("prefill", "decode"):
        raise ValueError(f"kernel profile must be 'prefill' or 'decode', got {profile!r}")
    token = _PROFILE.set(profile)
    try:
        yield
    finally:
        _PROFILE.reset(token)


# ---------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------
def package_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                 profile: str = "prefill") -> torch.Tensor:
    """The package GEMM's value of `a @ b (+ bias)` before the output rounding.

    Args:
        a: `[..., M, K]` fp16/bf16 (upcast exactly to fp64).
        b: `[..., K, N]`, broadcastable batch dims.
        bias: optional `[N]`, added before the rounding (cuBLAS epilogue).
        profile: "prefill" — the exact sum (fp64), to be rounded once; "decode" — split-K: each
            of `SPLIT_K` contiguous K slices summed exactly and rounded to fp32, the partial
            sums and the bias added in fp32 in order (K < 2 * `SPLIT_K`: as "prefill").

    Returns:
        `[..., M, N]` fp64 ("prefill") or fp32 ("decode").

    Raises:
        ValueError: `a` or `b` has fewer than 2 dims.
    """
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"package GEMM needs 2-D or batched operands, got {tuple(a.shape)} @ {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    k = a.shape[-1]
    if profile != "decode" or k < 2 * SPLIT_K:
        out = a64 @ b64
        return out if bias is None else out + bias.double()
    edges = [g * k // SPLIT_K for g in range(SPLIT_K + 1)]
    acc = None
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        part = (a64[..., lo:hi] @ b64[..., lo:hi, :]).float()
        acc = part if acc is None else acc + part
    return acc if bias is None else acc + bias.float()


class _GemmFn(torch.autograd.Function):
    """Package GEMM forward; backward = gradient of the exact product, fp32 GEMMs, rounded."""

    @staticmethod
    def forward(ctx, a, b, bias, profile, out_dtype):  # type: ignore[override]
        ctx.save_for_backward(a, b)
        ctx.has_bias = bias is not None
        return package_gemm(a, b, bias, profile).to(out_dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a, b = ctx.saved_tensors
        g32 = g.float()
        ga = gb = gbias = None
        if ctx.needs_input_grad[0]:
            ga = _sum_to(torch.matmul(g32, b.float().transpose(-1, -2)), a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            gb = _sum_to(torch.matmul(a.float().transpose(-1, -2), g32), b.shape).to(b.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gbias = g32.reshape(-1, g32.shape[-1]).sum(0).to(g.dtype)
        return ga, gb, gbias, None, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce broadcast batch dims of a gradient back to `shape`."""
    while t.dim() > len(shape):
        t = t.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and t.shape[i] != 1:
            t = t.sum(i, keepdim=True)
    return t


def package_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` under the package GEMM of the current profile.

    Args:
        x: `[..., K]` fp16/bf16 input.
        weight: `[N, K]` in `x.dtype`.
        bias: optional `[N]`, added before the output rounding (cuBLAS epilogue).

    Returns:
        `[..., N]` in `x.dtype`.
    """
    out = _GemmFn.apply(x.reshape(-1, x.shape[-1]), weight.t(), bias, _PROFILE.get(), x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def package_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` (batched, broadcasting) under the package GEMM of the current profile.

    1-D operands follow torch's matmul rules (promoted, multiplied, the added dim dropped).

    Args:
        a: `[..., M, K]` or `[K]` fp16/bf16.
        b: `[..., K, N]` or `[K]` in `a.dtype`.

    Returns:
        The product in `a.dtype`, rounded once from the package GEMM's value.
    """
    if a.dim() == 1 or b.dim() == 1:  # vector cases: promote, multiply, drop the added dims (torch semantics)
        out = package_matmul(a.unsqueeze(0) if a.dim() == 1 else a, b.unsqueeze(-1) if b.dim() == 1 else b)
        if b.dim() == 1:
            out = out.squeeze(-1)
        return out.squeeze(-1 if b.dim() == 1 else -2) if a.dim() == 1 else out
    return _GemmFn.apply(a, b, None, _PROFILE.get(), a.dtype)


def package_addmm(input: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, *, beta: float = 1.0,
                  alpha: float = 1.0) -> torch.Tensor:
    """`torch.addmm` / `torch.baddbmm` (`beta·input + alpha·(m1 @ m2)`) under the package GEMM.

    The product's accumulator (rounded to fp32), scaled and added in fp32 as a cuBLAS epilogue,
    rounded once to `m1.dtype`. With `beta == 0`, `input` is ignored (NaNs in it too), as in torch.
    Megatron's local attention computes Q·Kᵀ this way.

    Args:
        input: broadcastable to the product's shape.
        m1: `[M, K]` or `[B, M, K]` fp16/bf16.
        m2: `[K, N]` or `[B, K, N]` in `m1.dtype`.
        beta: scale of `input`.
        alpha: scale of the product.

    Returns:
        `[M, N]` or `[B, M, N]` in `m1.dtype`.
    """
    d = m1.dtype
    acc = _GemmFn.apply(m1, m2, None, _PROFILE.get(), torch.float32)
    out = acc * alpha if alpha != 1 else acc
    if beta != 0:
        out = out + beta * input.float()
    return out.to(d)


def package_grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, *, offs: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`F.grouped_mm` (MoE experts) as one package GEMM per group.

    Args:
        mat_a: `[S, K]` rows, grouped by `offs`.
        mat_b: `[G, K, N]`, one matrix per group.
        offs: `[G]` cumulative row ends of the groups.
        bias: must be None.
        out_dtype: None or `mat_a.dtype`.

    Returns:
        `[S, N]` in `mat_a.dtype` (rows past `offs[-1]`: 0).

    Raises:
        NotImplementedError: other layouts, a `bias` or another `out_dtype` (refused rather than
            computed by the host's kernel).
    """
    if mat_a.dim() != 2 or mat_b.dim() != 3 or offs is None or bias is not None or out_dtype not in (None, mat_a.dtype):
        raise NotImplementedError(f"package CPU kernels: grouped_mm of {tuple(mat_a.shape)} x {tuple(mat_b.shape)} "
                                  f"(offs {'set' if offs is not None else 'None'}, bias/out_dtype) is not implemented; "
                                  f"set {KERNELS_ENV}=native for this model")
    ends = [int(e) for e in offs.tolist()]
    parts = [package_matmul(mat_a[lo:hi], mat_b[g]) for g, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True))]
    if ends[-1] < mat_a.shape[0]:
        parts.append(mat_a.new_zeros(mat_a.shape[0] - ends[-1], mat_b.shape[-1]))
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def _exact_bmm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One-tile dot products (head dim or a key block) in fp64, rounded once to fp32."""
    return torch.matmul(a.double(), b.double()).float()


def _exp32(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).float()


def _rowsum32(x: torch.Tensor) -> torch.Tensor:
    return x.double().sum(-1, keepdim=True).float()


def _keep_mask(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Boolean `[B|1, H|1, Tq, Tk]` mask of the (query, key) pairs that attend (torch SDPA rules)."""
    tq, tk = q.shape[-2], k.shape[-2]
    keep = torch.ones(1, 1, tq, tk, dtype=torch.bool)
    if is_causal:
        keep = keep & torch.ones(tq, tk, dtype=torch.bool).tril()
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        if attn_mask.dtype != torch.bool:
            m = m & (attn_mask > torch.finfo(attn_mask.dtype).min)  # HF's "min value" masking
        while m.dim() < 4:
            m = m.unsqueeze(0)
        keep = keep & m
    return keep


def package_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      scale: float, profile: str) -> torch.Tensor:
    """Attention output `[B, H, Tq, D]` in `q.dtype` under the profile's kernel (module doc).

    Rows with no key to attend (padding queries) return 0 instead of NaN.

    Args:
        q: `[B, H, Tq, D]` fp16/bf16.
        k: `[B, H, Tk, D]` in `q.dtype` (KV heads already expanded).
        v: `[B, H, Tk, D]` in `q.dtype`.
        keep: boolean, broadcastable to `[B, H, Tq, Tk]`: which keys each query attends.
        scale: softmax scale (1/sqrt(D) by default in SDPA).
        profile: "decode" runs split-KV for every query row; "prefill" the FA2 forward.

    Returns:
        `[B, H, Tq, D]` in `q.dtype`, rounded once from the fp32 accumulator.
    """
    d = q.dtype
    keep = keep.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    s = _exact_bmm32(q, k.transpose(-1, -2)) * scale                    # [B, H, Tq, Tk] fp32
    s = s.masked_fill(~keep, float("-inf"))
    # blocks are aligned to each row's first real key, as varlen kernels see no padding
    first = keep.any(-2, keepdim=True).float().argmax(-1, keepdim=True)  # [B, H, 1, 1]
    rel = torch.arange(k.shape[2]).view(1, 1, 1, -1) - first             # [B, H, 1, Tk]
    if profile == "decode":  # every query row is a one-token step (HF may pack GQA heads into Tq)
        return _split_kv(s, v, rel, d)
    return _flash_forward(s, v, rel, d)


def _flash_forward(s: torch.Tensor, v: torch.Tensor, rel: torch.Tensor, d: torch.dtype) -> torch.Tensor:
    """FlashAttention-2 forward over key blocks of ATTN_BLOCK_N (online softmax)."""
    shape = s.shape[:-1] + (1,)
    m = torch.full(shape, float("-inf"))
    l_sum = torch.zeros(shape)
    acc = torch.zeros(s.shape[:-1] + (v.shape[-1],))
    n_blocks = int(rel.max()) // ATTN_BLOCK_N + 1
    for j in range(n_blocks):
        in_blk = (rel >= j * ATTN_BLOCK_N) & (rel < (j + 1) * ATTN_BLOCK_N)
        sj = s.masked_fill(~in_blk, float("-inf"))
        m_new = torch.maximum(m, sj.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = _exp32(m - m_safe)                                        # exp(-inf) = 0 at start
        p = _exp32(sj - m_safe)
        l_sum = l_sum * alpha + _rowsum32(p)
        acc = acc * alpha + _exact_bmm32(p.to(d), v)
        m = m_new
    out = acc / l_sum
    return torch.where(l_sum > 0, out, torch.zeros_like(out)).to(d)


def _split_kv(s: torch.Tensor, v: torch.Tensor, rel: torch.Tensor, d: torch.dtype) -> torch.Tensor:
    """FlashAttention split-KV decode: softmax per split of KV_SPLIT keys, fp32 LSE combine."""
    n_splits = max(1, int(rel.max()) // KV_SPLIT + 1)
    outs, lses = [], []
    for j in range(n_splits):
        in_split = (rel >= j * KV_SPLIT) & (rel < (j + 1) * KV_SPLIT)
        sj = s.masked_fill(~in_split, float("-inf"))
        m = sj.amax(-1, keepdim=True)
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = _exp32(sj - m_safe)
        l_sum = _rowsum32(p)
        o = _exact_bmm32(p.to(d), v) / l_sum
        outs.append(torch.where(l_sum > 0, o, torch.zeros_like(o)))
        lses.append(torch.where(l_sum > 0, m_safe + torch.log(l_sum.double()).float(),
                                torch.full_like(l_sum, float("-inf"))))
    lse = torch.stack(lses)                                              # [S, B, H, 1, 1]
    lse_max = lse.amax(0)
    lse_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = _exp32(lse - lse_max)
    total = w.double().sum(0).float()
    out = torch.zeros_like(outs[0])
    for j in range(n_splits):  # fixed order fp32 combine
        out = out + (w[j] / torch.where(total > 0, total, torch.ones_like(total))) * outs[j]
    return out.to(d)


class _AttnFn(torch.autograd.Function):
    """Package attention forward; backward = gradient of exact fp32 attention, rounded."""

    @staticmethod
    def forward(ctx, q, k, v, keep, scale, profile):  # type: ignore[override]
        ctx.save_for_backward(q, k, v, keep)
        ctx.scale = scale
        return package_attention(q, k, v, keep, scale, profile)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        q, k, v, keep = ctx.saved_tensors
        with torch.enable_grad():
            q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
            s = (q32 @ k32.transpose(-1, -2)) * ctx.scale
            s = s.masked_fill(~keep, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            out = p @ v32
            gq, gk, gv = torch.autograd.grad(out, (q32, k32, v32), g.float())
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        raise ValueError("package CPU kernels: attention dropout is not supported (engines run in eval mode)")
    if key.shape[-3] != query.shape[-3]:  # GQA: expand KV heads (exact)
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    keep = _keep_mask(query, key, attn_mask, is_causal)
    return _AttnFn.apply(query, key, value, keep, scale, _PROFILE.get())
