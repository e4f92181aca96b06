"""The package's CPU fp16/bf16 kernels against fp64 references of the semantics they claim.

Each kernel path says which real kernel it stands for (nemo_rl_fp16/precision/cpu_numerics.py); these tests
check the stated rounding semantics within their ulp bounds, the structural identities of each
path (FA2 forward with one key block = plain rounded softmax; split-KV with one split = FA2),
invariance to batch composition and left padding, and that the two paths do differ.
"""

from __future__ import annotations

import pytest
import torch

import nemo_rl_fp16.precision.cpu_kernels as ck

LOWP = [torch.float16, torch.bfloat16]


def _mant(dtype):
    return {torch.float16: 10, torch.bfloat16: 7}[dtype]


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", LOWP)
def test_gemm_prefill_is_the_correctly_rounded_product(dtype):
    """Prefill/training GEMM = exact sum (+ bias), rounded once: the fp64 reference rounded."""
    x, w, b = _rand((37, 200), dtype, 0), _rand((24, 200), dtype, 1), _rand((24,), dtype, 2)
    out = ck.package_linear(x, w, b)
    assert out.dtype == dtype
    assert torch.equal(out, (x.double() @ w.double().T + b.double()).to(dtype))


@pytest.mark.parametrize("dtype", LOWP)
def test_gemm_decode_within_stated_bound_of_fp64(dtype):
    """Split-K: within 0.5 ulp of the exact result plus SPLIT_K + 1 fp32 roundings."""
    x, w, b = _rand((37, 200), dtype, 0), _rand((24, 200), dtype, 1), _rand((24,), dtype, 2)
    with ck.kernel_profile("decode"):
        out = ck.package_linear(x, w, b)
    ref = x.double() @ w.double().T + b.double()
    acc_err = (ck.SPLIT_K + 1) * 2.0**-24 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    bound = 0.5 * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - _mant(dtype)) + acc_err
    assert ((out.double() - ref).abs() <= bound * (1 + 1e-9)).all()


@pytest.mark.parametrize("dtype", LOWP)
def test_gemm_decode_split_k_differs_but_rows_are_batch_invariant(dtype):
    x, w = _rand((64, 256), dtype, 3), _rand((96, 256), dtype, 4)
    pre = ck.package_linear(x, w)
    with ck.kernel_profile("decode"):
        dec = ck.package_linear(x, w)
        one = ck.package_linear(x[5:6], w)
    acc_pre = ck.package_gemm(x, w.T, profile="prefill")
    acc_dec = ck.package_gemm(x, w.T, profile="decode")
    assert (acc_pre != acc_dec).any(), "split-K must change the accumulation (it is the decode kernel)"
    assert ((acc_pre - acc_dec).abs() <= 2.0**-22 * (x.double().abs() @ w.double().abs().T)).all()
    assert torch.equal(one, dec[5:6]), "a row's result must not depend on the other rows"
    assert torch.equal(ck.package_linear(x[:7], w), pre[:7])


def _attn_ref(q, k, v, keep, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return p @ v.double()


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("profile", ["prefill", "decode"])
def test_attention_within_bound_of_fp64(dtype, profile):
    """P rounded to dtype before P·V: |error| <= u·Σ P|v| + 0.5 ulp(out) (+ fp32 terms)."""
    b, h, t, dh = 2, 3, 90, 16
    q, k, v = (_rand((b, h, t, dh), dtype, s) for s in (5, 6, 7))
    keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    out = ck.package_attention(q, k, v, keep, dh**-0.5, profile)
    ref = _attn_ref(q, k, v, keep, dh**-0.5)
    s = (q.double() @ k.double().transpose(-1, -2)) * dh**-0.5
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    u = 2.0 ** -_mant(dtype)
    bound = u * (p @ v.double().abs()) + 0.5 * u * 2 * ref.abs() + 1e-6 * (p @ v.double().abs())
    assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("dtype", LOWP)
def test_attention_paths_are_the_kernels_they_claim(dtype):
    """One FA2 block (Tk <= ATTN_BLOCK_N) is the plain rounded softmax; split-KV with one split
    equals it; more splits change roundings (decode != prefill)."""
    t, dh = ck.ATTN_BLOCK_N, 16
    q, k, v = (_rand((1, 2, t, dh), dtype, s) for s in (8, 9, 10))
    keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    pre = ck.package_attention(q, k, v, keep, 0.25, "prefill")
    s = (q.double() @ k.double().transpose(-1, -2)).float() * 0.25
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.exp((s - s.amax(-1, keepdim=True)).double()).float()
    manual = ((p.to(dtype).double() @ v.double()).float() / p.double().sum(-1, keepdim=True).float()).to(dtype)
    assert torch.equal(pre, manual)
    row = slice(ck.KV_SPLIT - 1, ck.KV_SPLIT)  # a query that sees exactly one split
    assert torch.equal(ck.package_attention(q[:, :, row], k, v, keep[:, :, row], 0.25, "decode"), pre[:, :, row])
    dec = ck.package_attention(q[:, :, -1:], k, v, keep[:, :, -1:], 0.25, "decode")
    assert (dec != pre[:, :, -1:]).any()


@pytest.mark.parametrize("profile", ["prefill", "decode"])
def test_attention_ignores_left_padding(profile):
    """Blocks/splits start at each row's first real key (varlen kernels see no padding)."""
    dtype, t, pad, dh = torch.bfloat16, 40, 7, 16
    q, k, v = (_rand((1, 2, t, dh), dtype, s) for s in (11, 12, 13))
    keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    ref = ck.package_attention(q, k, v, keep, 0.25, profile)
    zp = torch.zeros(1, 2, pad, dh, dtype=dtype)
    qp, kp, vp = (torch.cat([zp, x], 2) for x in (q, k, v))
    keep_p = torch.zeros(t + pad, t + pad, dtype=torch.bool)
    keep_p[pad:, pad:] = keep[0, 0]
    out = ck.package_attention(qp, kp, vp, keep_p[None, None], 0.25, profile)
    assert torch.equal(out[:, :, pad:], ref)
    assert torch.equal(out[:, :, :pad], torch.zeros_like(out[:, :, :pad])), "padding queries give 0, not NaN"
