"""Loss normalisation in one place: micro-batches and data-parallel slices of one optimizer batch,
each normalised by the whole batch's valid tokens / sequences, sum to the full-batch loss, gradient
and metrics, for every algorithm x correction x reduction with the KL-to-reference term on."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.algorithms import VALID_PAIRINGS, combine_metrics, policy_loss

REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
COMBOS = [(a, c, r) for a, cs in VALID_PAIRINGS.items() for c in cs for r in REDUCTIONS]
B, T = 6, 9


def _case(dtype: torch.dtype, seed: int = 0):
    """Uneven lengths (1..9 tokens, one empty row), ratios that clip, MIS weights past the cap."""
    g = torch.Generator().manual_seed(seed)
    logp = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    roll = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 9, 0, 4, 7, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (logp, old, roll, ref, adv)] + [mask]


def _slices(rows: range, size: int) -> list[slice]:
    return [slice(s, min(s + size, rows.stop)) for s in range(rows.start, rows.stop, size)]


def _run(alg, correction, reduction, dtype, groups: list[slice], global_norm: bool):
    """Sum of the parts' losses, the accumulated gradient and the combined metrics."""
    logp, old, roll, ref, adv, mask = _case(dtype)
    lp = logp.clone().requires_grad_()
    norm = ({"global_valid_toks": float(mask.sum()), "global_valid_seqs": float(mask.any(-1).sum())}
            if global_norm else {})
    total, parts = 0.0, []
    for rows in groups:
        loss, metrics = policy_loss(alg, lp[rows], old[rows], roll[rows], adv[rows], mask[rows],
                                    correction=correction, reduction=reduction, clip_low=0.2, clip_high=0.28,
                                    ref_logp=ref[rows], kl_coef=0.1, kl_kind="k3", **norm)
        loss.backward()
        total += float(loss.detach())
        parts.append(metrics)
    return total, lp.grad.clone(), combine_metrics(parts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("alg,correction,reduction", COMBOS)
def test_micro_batches_and_dp_split_give_the_full_batch_gradient(alg, correction, reduction, dtype, tol):
    full_loss, full_grad, full_metrics = _run(alg, correction, reduction, dtype, [slice(0, B)], False)
    assert full_grad.abs().sum() > 0 and "kl_to_ref" in full_metrics
    splits = {f"micro-batch {k}": _slices(range(B), k) for k in (1, 2, 3, B)}
    # data parallel: rank r takes rows [r*B/2, (r+1)*B/2) in micro-batches of 2; gradients are summed
    splits["DP 2 x micro-batch 2"] = _slices(range(0, B // 2), 2) + _slices(range(B // 2, B), 2)
    for name, groups in splits.items():
        loss, grad, metrics = _run(alg, correction, reduction, dtype, groups, True)
        assert _rel(grad, full_grad) <= tol, (name, _rel(grad, full_grad))
        assert loss == pytest.approx(full_loss, rel=tol, abs=tol), name
        for k, v in full_metrics.items():
            assert metrics[k] == pytest.approx(v, rel=tol, abs=tol), (name, k)


@pytest.mark.parametrize("alg,reduction", [("gspo", "token_mean"), ("pg_seq_is", "token_mean"),
                                           ("grpo", "seq_mean_token_mean"), ("grpo", "seq_mean_token_sum")])
def test_the_old_split_normalisation_fails_the_check(alg, reduction):
    """The check above can fail for the reason it states: the loop used to weight each micro-batch's
    loss (policy term + its own KL token mean) by its row share; with kl_coef > 0 that moves the
    gradient with the micro-batch size by far more than the tolerance."""
    logp, old, roll, ref, adv, mask = _case(torch.float64)
    grads = []
    for size in (1, 4):
        lp = logp.clone().requires_grad_()
        for rows in _slices(range(B), size):
            loss, _ = policy_loss(alg, lp[rows], old[rows], roll[rows], adv[rows], mask[rows], correction="none",
                                  reduction=reduction, ref_logp=ref[rows], kl_coef=0.1)
            m = mask[rows]
            w = (float(m.any(-1).sum()) / float(mask.any(-1).sum()) if reduction == "seq_mean_token_mean"
                 else (rows.stop - rows.start) / B)
            (loss * w).backward()
        grads.append(lp.grad.clone())
    assert _rel(grads[1], grads[0]) > 1e-3


def test_global_counts_are_checked():
    logp, old, roll, ref, adv, mask = _case(torch.float64)
    with pytest.raises(ValueError, match="global_valid_toks"):
        policy_loss("grpo", logp, old, roll, adv, mask, global_valid_toks=-1.0)
    with pytest.raises(ValueError, match="global_valid_seqs"):
        policy_loss("grpo", logp, old, roll, adv, mask, global_valid_seqs=float("inf"))
    with pytest.raises(ValueError, match="ref_logp is required"):
        policy_loss("grpo", logp, old, roll, adv, mask, kl_coef=0.1)


# ----------------------------------------------------------------------------- numerical edges
EXTREMES = (0.0, -1e-8, -0.5, -20.0, -88.0, -100.0, -1e3, -1e4, -3e4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alg,correction,reduction", COMBOS)
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_no_nan_gradient_from_any_finite_input(alg, correction, reduction, dtype, kl_kind):
    """Every pairing of extreme finite log-probs (log-ratios up to ±3e4 in each of π/π_old/µ/ref) and
    advantages: loss and gradient finite. The issue's fault: grpo/gspo at a log-ratio of 100 gave a
    finite loss and a NaN gradient (0·inf)."""
    vals = torch.tensor(EXTREMES, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 64
    pick = lambda: vals[torch.randint(len(vals), (n, 5), generator=g)]  # noqa: E731
    logp, old, roll, ref = pick(), pick(), pick(), pick()
    logp[0], old[0] = 0.0, -100.0  # the case: log r = +100 on a whole row
    logp[1], old[1] = -100.0, 0.0
    adv = torch.tensor([1e3, -1e3, 1.0, -1.0, 0.0, 3.0, -3.0, 1e-3] * (n // 8), dtype=torch.float64)
    mask = torch.rand(n, 5, generator=g) < 0.8
    mask[:2] = True
    lp = logp.to(dtype).requires_grad_()
    loss, metrics = policy_loss(alg, lp, old.to(dtype), roll.to(dtype), adv.to(dtype), mask, correction=correction,
                                reduction=reduction, ref_logp=ref.to(dtype), kl_coef=0.1, kl_kind=kl_kind)
    loss.backward()
    assert torch.isfinite(loss), float(loss)
    assert not torch.isnan(lp.grad).any()
    if dtype in (torch.float32, torch.float64):  # fp16 may round a true 1e11 gradient to inf: not a NaN
        assert torch.isfinite(lp.grad).all()
    assert all(v == v for v in metrics.values())
    assert metrics["ratio_max"] <= float(torch.tensor(20.0).exp()) * (1 + 1e-6)


def test_log_ratio_clamp_keeps_the_definition_inside_the_bound():
    """Inside |log r| <= 20 the clamp changes nothing: grpo's unclipped branch at log r = 19 with A < 0
    has the exact gradient -r·A / N_tok."""
    logp = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-19.0]], dtype=torch.float64)
    loss, _ = policy_loss("grpo", logp, old, None, torch.tensor([-1.0], dtype=torch.float64),
                          torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    assert float(logp.grad) == pytest.approx(float(torch.tensor(19.0, dtype=torch.float64).exp()), rel=1e-12)
