"""The package CPU numerics mode: gradients of the exact ops, the switches and host detection, and
torch's baddbmm/addmm routed to the package GEMM. The kernels themselves: test_cpu_kernels.py."""

from __future__ import annotations

import pytest
import torch

import nemo_rl_fp16.precision.cpu_numerics as cn

LOWP = [torch.float16, torch.bfloat16]


def _mant(dtype):
    return {torch.float16: 10, torch.bfloat16: 7}[dtype]


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", LOWP)
def test_gradients_are_the_exact_ops_gradients(dtype):
    x = _rand((9, 64), dtype, 14).requires_grad_(True)
    w = _rand((12, 64), dtype, 15).requires_grad_(True)
    with cn.PackageNumericsMode(dtype):
        y = torch.nn.functional.linear(x, w)
        q = y.view(1, 1, 9, 12)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        a.float().sum().backward()
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    q32 = (x32 @ w32.T).view(1, 1, 9, 12)
    torch.nn.functional.scaled_dot_product_attention(q32, q32, q32, is_causal=True).sum().backward()
    tol = 8 * 2.0 ** -_mant(dtype)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    for got, want in ((x.grad, x32.grad), (w.grad, w32.grad)):
        assert (got.float() - want).abs().max() <= tol * want.abs().max()


def test_switches_and_detection_override(monkeypatch):
    monkeypatch.setenv(cn.ISA_ENV, "avx2")
    assert cn.cpu_isa() == "avx2" and not cn.cpu_has_native(torch.bfloat16)
    monkeypatch.setenv(cn.ISA_ENV, "avx512_bf16")
    assert cn.cpu_has_native(torch.bfloat16) and not cn.cpu_has_native(torch.float16)
    monkeypatch.setenv(cn.ISA_ENV, "sse")
    with pytest.raises(ValueError, match=cn.ISA_ENV):
        cn.cpu_isa()
    monkeypatch.delenv(cn.ISA_ENV)
    assert isinstance(cn.cpu_numerics("cpu", torch.bfloat16), cn.PackageNumericsMode)
    assert not isinstance(cn.cpu_numerics("cpu", torch.float32), cn.PackageNumericsMode)
    assert not isinstance(cn.cpu_numerics("meta", torch.float16), cn.PackageNumericsMode)
    monkeypatch.setenv(cn.KERNELS_ENV, "native")
    assert not isinstance(cn.cpu_numerics("cpu", torch.bfloat16), cn.PackageNumericsMode)
    assert cn.numerics_record()["kernels"] == "native"
    monkeypatch.setenv(cn.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match=cn.KERNELS_ENV):
        cn.cpu_numerics("cpu", torch.float16)


@pytest.mark.parametrize("dtype", LOWP)
def test_baddbmm_is_the_package_gemm_with_an_fp32_epilogue(dtype):
    """megatron's local attention: baddbmm(buf, q, kᵀ, beta=0, alpha=s) -> round(fl32(s·fl32(q·kᵀ)))."""
    q, k = _rand((3, 5, 16), dtype, 20), _rand((3, 7, 16), dtype, 21)
    buf = torch.full((3, 5, 7), float("nan"), dtype=dtype)
    with cn.PackageNumericsMode(dtype):
        out = torch.baddbmm(buf, q, k.transpose(1, 2), beta=0.0, alpha=0.25)
        both = torch.addmm(_rand((4,), dtype, 22), q[0], k[0].T[:, :4])
    want = ((q.double() @ k.double().transpose(1, 2)).float() * 0.25).to(dtype)
    assert torch.equal(out, want)
    assert torch.equal(both, ((q[0].double() @ k[0].double().T[:, :4]).float() + _rand((4,), dtype, 22).float()).to(dtype))
