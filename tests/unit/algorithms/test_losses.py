"""policy_loss against an independent per-token float64 reference written with python loops."""

import math

import pytest
import torch

from nemo_rl_fp16.algorithms import VALID_PAIRINGS, policy_loss

REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
COMBOS = [(a, c, r) for a, cs in VALID_PAIRINGS.items() for c in cs for r in REDUCTIONS]
CLIP_LOW, CLIP_HIGH, IS_CAP = 0.2, 0.28, 2.0


# ----------------------------------------------------------------------------- reference
def reference_loss(alg, logp, old, roll, adv, mask, correction, reduction,
                   clip_low=CLIP_LOW, clip_high=CLIP_HIGH, is_cap=IS_CAP):
    """Slow, literal transcription of the spec. Returns (loss, clip_fraction, mis_masked_frac)."""
    B, T = logp.shape
    valid = [[t for t in range(T) if mask[i, t]] for i in range(B)]

    def a_tok(i, t):
        return float(adv[i]) if adv.dim() == 1 else float(adv[i, t])

    def a_seq(i):
        if adv.dim() == 1:
            return float(adv[i])
        return sum(float(adv[i, t]) for t in valid[i]) / len(valid[i])

    logp_val = logp.detach()

    def mis_weight(log_rho):
        return math.exp(log_rho) if math.exp(log_rho) <= is_cap else 0.0

    zero = logp.sum() * 0.0
    clipped_hits, clip_units, mis_hits, nonempty = 0, 0, 0, 0
    for i in range(B):
        if valid[i]:
            nonempty += 1
            if correction == "mis":
                diff = logp_val if alg == "pg_seq_is" else old
                log_rho = sum(float(diff[i, t]) - float(roll[i, t]) for t in valid[i])
                mis_hits += math.exp(log_rho) > is_cap

    if alg == "grpo":
        rows = []
        for i in range(B):
            w_seq = 1.0
            if correction == "mis" and valid[i]:
                w_seq = mis_weight(sum(float(old[i, t]) - float(roll[i, t]) for t in valid[i]))
            terms = []
            for t in valid[i]:
                r = torch.exp(logp[i, t] - old[i, t])
                a = a_tok(i, t)
                unclipped, clipped = r * a, torch.clamp(r, 1 - clip_low, 1 + clip_high) * a
                clipped_hits += bool(clipped < unclipped)
                clip_units += 1
                term = -torch.minimum(unclipped, clipped)
                if correction == "tis":
                    term = term * min(math.exp(float(old[i, t]) - float(roll[i, t])), is_cap)
                terms.append(term * w_seq)
            rows.append(terms)
        if reduction == "token_mean":
            n = sum(len(r) for r in rows)
            loss = sum((x for r in rows for x in r), zero) / n if n else zero
        elif reduction == "seq_mean_token_mean":
            means = [sum(r, zero) / len(r) for r in rows if r]
            loss = sum(means, zero) / len(means) if means else zero
        else:
            loss = sum((sum(r, zero) for r in rows), zero) / max(nonempty, 1)
    elif alg == "gspo":
        loss = zero
        for i in range(B):
            if not valid[i]:
                continue
            s = torch.exp(sum((logp[i, t] - old[i, t] for t in valid[i]), zero) / len(valid[i]))
            a = a_seq(i)
            unclipped, clipped = s * a, torch.clamp(s, 1 - clip_low, 1 + clip_high) * a
            clipped_hits += bool(clipped < unclipped)
            clip_units += 1
            l_i = -torch.minimum(unclipped, clipped)
            if correction == "mis":
                l_i = l_i * mis_weight(sum(float(old[i, t]) - float(roll[i, t]) for t in valid[i]))
            loss = loss + l_i
        loss = loss / max(nonempty, 1)
    else:
        loss = zero
        for i in range(B):
            if not valid[i]:
                continue
            log_rho = sum(float(logp_val[i, t]) - float(roll[i, t]) for t in valid[i])
            rho = mis_weight(log_rho) if correction == "mis" else math.exp(min(log_rho, 20.0))
            loss = loss - rho * a_seq(i) * sum((logp[i, t] for t in valid[i]), zero)
        loss = loss / max(nonempty, 1)
    clip_frac = clipped_hits / clip_units if clip_units else 0.0
    mis_frac = mis_hits / nonempty if nonempty else 0.0
    return loss, clip_frac, mis_frac


def make_case(seed, B=6, T=7, adv_2d=False, random_mask=False, float_mask=False):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logp + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)  # clipping happens
    roll = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # some rho > cap
    if random_mask:
        mask = torch.rand(B, T, generator=g) < 0.6
    else:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[0] = False  # one empty row
    mask[1] = True  # one full row
    shape = (B, T) if adv_2d else (B,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    return logp, old, roll, adv, (mask.double() if float_mask else mask)


# ----------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("alg,correction,reduction", COMBOS)
def test_matches_reference_loss_and_grad(alg, correction, reduction):
    clip_seen, mis_seen = [], []
    for seed in range(6):
        for adv_2d in (False, True):
            logp, old, roll, adv, mask = make_case(
                seed, adv_2d=adv_2d, random_mask=seed % 2 == 1, float_mask=seed == 2
            )
            lp_impl = logp.clone().requires_grad_()
            loss, metrics = policy_loss(
                alg, lp_impl, old, roll, adv, mask, correction=correction, clip_low=CLIP_LOW,
                clip_high=CLIP_HIGH, is_cap=IS_CAP, reduction=reduction,
            )
            lp_ref = logp.clone().requires_grad_()
            ref, clip_frac, mis_frac = reference_loss(
                alg, lp_ref, old, roll, adv, mask.bool(), correction, reduction
            )
            assert loss.dim() == 0 and loss.dtype == torch.float64
            torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
            (g_impl,) = torch.autograd.grad(loss, lp_impl)
            (g_ref,) = torch.autograd.grad(ref, lp_ref, allow_unused=True)
            g_ref = torch.zeros_like(logp) if g_ref is None else g_ref
            torch.testing.assert_close(g_impl, g_ref, rtol=1e-10, atol=1e-12)
            assert metrics["clip_fraction"] == pytest.approx(clip_frac)
            assert metrics["mis_masked_fraction"] == pytest.approx(mis_frac)
            assert all(isinstance(v, float) for v in metrics.values())
            clip_seen.append(clip_frac)
            mis_seen.append(mis_frac)
    if alg != "pg_seq_is":  # the cases really exercise clipping ...
        assert max(clip_seen) > 0
    if correction == "mis":  # ... and MIS masking
        assert max(mis_seen) > 0


@pytest.mark.parametrize("alg", ["gspo", "pg_seq_is"])
@pytest.mark.parametrize("correction", ["none", "mis"])
def test_sequence_level_losses_ignore_reduction(alg, correction):
    logp, old, roll, adv, mask = make_case(3)
    losses = [policy_loss(alg, logp, old, roll, adv, mask, correction=correction,
                          reduction=r)[0] for r in REDUCTIONS]
    assert all(torch.equal(losses[0], x) for x in losses[1:])


def test_grpo_reductions_differ_on_ragged_batch():
    logp, old, roll, adv, mask = make_case(4)
    losses = {r: float(policy_loss("grpo", logp, old, roll, adv, mask, reduction=r)[0])
              for r in REDUCTIONS}
    assert len({round(v, 12) for v in losses.values()}) == 3


def test_2d_advantages_sequence_level_use_masked_token_mean():
    logp, old, roll, adv2, mask = make_case(5, adv_2d=True)
    lengths = mask.sum(-1).clamp(min=1)
    adv1 = (adv2 * mask).sum(-1) / lengths
    for alg in ("gspo", "pg_seq_is"):
        a = policy_loss(alg, logp, old, roll, adv2, mask)[0]
        b = policy_loss(alg, logp, old, roll, adv1, mask)[0]
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- gradients
def _away_from_boundaries(seed, B=3, T=4):
    """A float64 case whose ratios are > 1e-3 away from every clip / cap kink."""
    kinks = torch.tensor([1 - CLIP_LOW, 1 + CLIP_HIGH], dtype=torch.float64)

    def near(x, points):
        return bool((x[:, None] - points).abs().min() < 1e-3)

    for s in range(seed, seed + 1000):
        logp, old, roll, adv, mask = make_case(s, B=B, T=T)
        mask[0] = True  # gradcheck wants every row to matter
        r = torch.exp(logp - old)[mask]
        seq = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
        log_rho = ((old - roll) * mask).sum(-1)
        cap = torch.tensor([math.log(IS_CAP)], dtype=torch.float64)
        if not (near(r, kinks) or near(seq, kinks) or near(log_rho, cap)):
            return logp, old, roll, adv, mask
    raise AssertionError("no case away from boundaries")


GRADCHECK = [("grpo", c, r) for c in VALID_PAIRINGS["grpo"] for r in REDUCTIONS] + [
    ("gspo", c, "token_mean") for c in VALID_PAIRINGS["gspo"]  # gspo ignores reduction
]


@pytest.mark.parametrize("alg,correction,reduction", GRADCHECK)
def test_gradcheck(alg, correction, reduction):
    logp, old, roll, adv, mask = _away_from_boundaries(10)

    def f(lp):
        return policy_loss(alg, lp, old, roll, adv, mask, correction=correction,
                           clip_low=CLIP_LOW, clip_high=CLIP_HIGH, reduction=reduction)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(),))


@pytest.mark.parametrize("correction", ["none", "mis"])
def test_pg_seq_is_gradcheck_with_fixed_rho(correction):
    # ρ_i is detached, so finite differences of plain logp would also move ρ. Passing
    # rollout_logp = logp − δ keeps ρ_i = exp(Σ m·δ) fixed and makes the check exact.
    logp, _, _, adv, mask = _away_from_boundaries(20)
    delta = 0.1 * torch.randn(logp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta[2] = 0.6  # log ρ_2 ≈ 2.4 > log 2: row masked by MIS

    def f(lp):
        return policy_loss("pg_seq_is", lp, lp.detach(), lp - delta, adv, mask,
                           correction=correction)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(),))


@pytest.mark.parametrize("correction", ["none", "mis"])
def test_pg_seq_is_gradient_is_minus_rho_a_m_over_b(correction):
    logp, old, roll, adv, mask = make_case(7)
    lp = logp.clone().requires_grad_()
    loss, metrics = policy_loss("pg_seq_is", lp, old, roll, adv, mask, correction=correction)
    loss.backward()
    log_rho = ((logp - roll) * mask).sum(-1)
    rho = torch.exp(log_rho)
    if correction == "mis":
        rho = torch.where(rho <= IS_CAP, rho, 0.0)
    expected = -(rho * adv)[:, None] * mask / int(mask.any(-1).sum())  # mean over valid sequences
    torch.testing.assert_close(lp.grad, expected)
    nonempty = mask.any(-1)
    assert metrics["is_weight_max"] == pytest.approx(float(rho[nonempty].max()))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("alg", ["gspo", "pg_seq_is"])
def test_tis_only_with_grpo(alg):
    logp, old, roll, adv, mask = make_case(0)
    with pytest.raises(ValueError) as e:
        policy_loss(alg, logp, old, roll, adv, mask, correction="tis")
    msg = str(e.value)
    assert alg in msg and "tis" in msg and "grpo: none, tis, mis" in msg and "gspo: none, mis" in msg


@pytest.mark.parametrize("kw,needle", [
    ({"algorithm": "ppo"}, "grpo, gspo, pg_seq_is"),
    ({"correction": "icepop"}, "none, tis, mis"),
    ({"reduction": "sum"}, "token_mean, seq_mean_token_mean, seq_mean_token_sum"),
    ({"is_cap": 0.0}, "is_cap"),
    ({"clip_low": -0.1}, "clip_low"),
])
def test_bad_arguments_raise(kw, needle):
    logp, old, roll, adv, mask = make_case(0)
    alg = kw.pop("algorithm", "grpo")
    with pytest.raises(ValueError) as e:
        policy_loss(alg, logp, old, roll, adv, mask, **kw)
    assert needle in str(e.value)


def test_bad_shapes_and_missing_rollout_raise():
    logp, old, roll, adv, mask = make_case(0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss("grpo", logp, old, roll, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss("grpo", logp, old, roll, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="rollout_logp is required"):
        policy_loss("pg_seq_is", logp, old, None, adv, mask)
    policy_loss("grpo", logp, old, None, adv, mask)  # unused rollout may be None


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("alg,correction,reduction", COMBOS)
def test_all_masked_batch_is_zero_with_grad(alg, correction, reduction):
    logp, old, roll, adv, mask = make_case(1)
    lp = logp.clone().requires_grad_()
    loss, metrics = policy_loss(alg, lp, old, roll, adv, torch.zeros_like(mask),
                                correction=correction, reduction=reduction)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(logp))
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("alg,correction,reduction", COMBOS)
def test_empty_rows_with_garbage_padding(alg, correction, reduction):
    logp, old, roll, adv, mask = make_case(2)
    # Row 0 is empty; fill it and all padding with inf/NaN: nothing may leak.
    for x, bad in ((logp, float("nan")), (old, float("inf")), (roll, -float("inf"))):
        x[~mask] = bad
    lp = logp.clone().requires_grad_()
    kw = dict(correction=correction, reduction=reduction)
    loss, _ = policy_loss(alg, lp, old, roll, adv, mask, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert torch.equal(lp.grad[~mask], torch.zeros_like(lp.grad[~mask]))
    rest, _ = policy_loss(alg, logp[1:], old[1:], roll[1:], adv[1:], mask[1:], **kw)
    torch.testing.assert_close(loss, rest)  # the empty row is not a valid sequence: not counted


def test_all_equal_rewards_zero_advantage_zero_loss():
    from nemo_rl_fp16.algorithms import group_advantages

    logp, old, roll, _, mask = make_case(3)
    adv = group_advantages(torch.full((logp.shape[0],), 0.7), group_size=3)
    assert torch.equal(adv, torch.zeros_like(adv))
    for alg, cs in VALID_PAIRINGS.items():
        for c in cs:
            lp = logp.clone().requires_grad_()
            loss, _ = policy_loss(alg, lp, old, roll, adv, mask, correction=c)
            loss.backward()
            assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))


@pytest.mark.parametrize("alg", ["grpo", "gspo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_mis_huge_log_ratio_masks_sequence_without_nan(alg, sign):
    logp, old, roll, adv, mask = make_case(4)
    roll = roll.clone()
    roll[2] = old[2] - sign * 1000.0  # log ρ_2 = ±1000·len
    lp = logp.float().requires_grad_()
    loss, metrics = policy_loss(alg, lp, old.float(), roll.float(), adv.float(), mask,
                                correction="mis")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert torch.equal(lp.grad[2], torch.zeros_like(lp.grad[2]))  # weight 0 (or e^-1000 = 0)
    if sign > 0:
        assert metrics["mis_masked_fraction"] >= 1 / int(mask.any(-1).sum())
    assert math.isfinite(metrics["is_weight_max"]) and metrics["is_weight_max"] <= IS_CAP


def test_pg_seq_is_huge_log_ratio():
    logp, old, roll, adv, mask = make_case(5)
    roll = roll.clone()
    roll[1] = logp[1] - 1000.0
    for correction, expect_rho in (("none", math.exp(20.0)), ("mis", 0.0)):
        lp = logp.float().requires_grad_()
        loss, metrics = policy_loss("pg_seq_is", lp, old.float(), roll.float(), adv.float(), mask,
                                    correction=correction)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        expected = -expect_rho * float(adv[1]) / int(mask.any(-1).sum())
        torch.testing.assert_close(lp.grad[1], torch.full_like(lp.grad[1], expected))


@pytest.mark.parametrize("offset,weight", [(1000.0, IS_CAP), (-1000.0, 0.0), (0.3, math.exp(0.3))])
def test_tis_caps_weight(offset, weight):
    logp, old, _, adv, mask = make_case(6)
    roll = old - offset
    base, _ = policy_loss("grpo", logp, old, roll, adv, mask)
    loss, metrics = policy_loss("grpo", logp, old, roll, adv, mask, correction="tis")
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, base * weight)
    assert metrics["is_weight_max"] == pytest.approx(weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("alg,correction", [(a, c) for a, cs in VALID_PAIRINGS.items() for c in cs])
def test_low_precision_inputs_compute_in_fp32(dtype, alg, correction):
    logp, old, roll, adv, mask = (x.to(dtype) if x.is_floating_point() else x
                                  for x in make_case(8))
    lp = logp.clone().requires_grad_()
    loss, metrics = policy_loss(alg, lp, old, roll, adv, mask, correction=correction)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == dtype
    up = [x.float() for x in (logp, old, roll, adv)]
    ref, _ = policy_loss(alg, *up[:3], up[3], mask, correction=correction)
    torch.testing.assert_close(loss, ref)  # same values, upcast before any math
    assert all(math.isfinite(v) for v in metrics.values())


def test_metrics_ratio_stats_grpo():
    logp, old, roll, adv, mask = make_case(9)
    _, m = policy_loss("grpo", logp, old, roll, adv, mask)
    r = torch.exp(logp - old)[mask]
    assert m["ratio_mean"] == pytest.approx(float(r.mean()))
    assert m["ratio_max"] == pytest.approx(float(r.max()))
    assert m["ratio_min"] == pytest.approx(float(r.min()))
    assert m["is_weight_mean"] == m["is_weight_max"] == 1.0 and m["mis_masked_fraction"] == 0.0
