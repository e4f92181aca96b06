import math

import pytest
import torch

from nemo_rl_fp16.algorithms import kl_estimate, kl_penalty

LOG2 = math.log(2.0)


def test_hand_case():
    p = torch.tensor([[math.log(0.5), math.log(0.25), 5.0]])
    q = torch.tensor([[math.log(0.25), math.log(0.5), -5.0]])
    mask = torch.tensor([[True, True, False]])  # log r = [log 2, -log 2], third token ignored
    assert kl_estimate(p, q, mask, "k1").item() == pytest.approx(0.0, abs=1e-7)
    assert kl_estimate(p, q, mask, "k2").item() == pytest.approx(0.5 * LOG2**2)
    # k3: (2 - 1 - log 2 + 0.5 - 1 + log 2) / 2 = 0.25
    assert kl_estimate(p, q, mask, "k3").item() == pytest.approx(0.25)
    only_first = torch.tensor([[1.0, 0.0, 0.0]])
    assert kl_estimate(p, q, only_first, "k1").item() == pytest.approx(-LOG2)
    assert kl_estimate(p, q, only_first, "k3").item() == pytest.approx(1 - LOG2)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_zero_when_equal_and_when_mask_empty(kind):
    x = torch.randn(3, 5)
    assert kl_estimate(x, x, torch.ones(3, 5), kind).item() == 0.0
    y = torch.randn(3, 5)
    assert kl_estimate(x, y, torch.zeros(3, 5, dtype=torch.bool), kind).item() == 0.0


def test_k3_nonnegative_and_finite_for_huge_ratios():
    g = torch.Generator().manual_seed(0)
    p = 5 * torch.randn(50, 40, generator=g)
    q = 5 * torch.randn(50, 40, generator=g)
    p[0, :3] = torch.tensor([1000.0, -1000.0, 30.0])
    m = torch.ones_like(p)
    per_tok = kl_penalty(q, p, m, "k3")  # log r = p - q per token
    assert (per_tok >= 0).all() and torch.isfinite(per_tok).all()
    assert math.isfinite(kl_estimate(p, q, m, "k3").item())
    c = torch.tensor(20.0)
    assert per_tok[0, 0].item() == pytest.approx((c.exp() - 1 - c).item(), rel=1e-5)


def test_monte_carlo_unbiased_k1_k3():
    # E_q[k1] = E_q[k3] = KL(q||p) for tokens sampled from q.
    q = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    p = torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=torch.float64)
    exact = float((q * (q / p).log()).sum())
    x = torch.multinomial(q, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    lp, lq = p.log()[x][None], q.log()[x][None]
    m = torch.ones_like(lp)
    for kind in ("k1", "k3"):
        assert kl_estimate(lp, lq, m, kind).item() == pytest.approx(exact, rel=0.05)


def test_kl_penalty_direction_grad_and_mask():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    pen = kl_penalty(logp, ref, mask, "k3")
    lr = torch.tensor([-0.5, 0.0])  # ref - logp
    torch.testing.assert_close(pen[0, :2], lr.exp() - 1 - lr)
    assert pen[0, 2].item() == 0.0
    pen.sum().backward()
    # d/dlogp (e^(ref-logp) - 1 - ref + logp) = 1 - e^(ref-logp)
    torch.testing.assert_close(logp.grad, torch.tensor([[1 - math.exp(-0.5), 0.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, mask, "k1")[0, :2], -lr)


def test_low_precision_inputs_upcast_and_errors():
    p = torch.randn(2, 4).to(torch.bfloat16)
    q = torch.randn(2, 4).to(torch.float16)
    out = kl_estimate(p, q, torch.ones(2, 4), "k3")
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(kl_estimate(p.float(), q.float(), torch.ones(2, 4)).item())
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(p, q, torch.ones(2, 4), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(p, q[:, :3], torch.ones(2, 4))
