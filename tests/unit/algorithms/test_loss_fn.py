"""`PolicyLossFn`: the declared metric denominators are the ones `policy_loss` divides by, and the
bound per-micro-batch loss sums to the whole batch's loss and metrics."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.algorithms import VALID_PAIRINGS, LossInputs, PolicyLossFn, combine_metrics
from nemo_rl_fp16.algorithms.loss_fn import MAX, MIN, VALID_SEQS, VALID_TOKS

CASES = [(a, c) for a, cs in VALID_PAIRINGS.items() for c in cs]


def _inputs(n=6, t=5, seed=0, ref=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t)
    mask[1, 2:] = 0
    mask[3, 1:] = 0
    mask[4] = 0  # an empty row: not a valid sequence
    old = -torch.rand(n, t, generator=g) * mask
    roll = old + 0.3 * torch.randn(n, t, generator=g) * mask
    logp = old + 0.2 * torch.randn(n, t, generator=g) * mask
    adv = torch.randn(n, generator=g)
    ref_logp = old + 0.1 * torch.randn(n, t, generator=g) * mask if ref else None
    return logp, LossInputs(old, roll, adv, mask, ref_logp)


@pytest.mark.parametrize(("algorithm", "correction"), CASES)
def test_declared_denominators_are_the_ones_divided_by(algorithm, correction):
    """Doubling one global count halves exactly the metrics declared over it, and no other."""
    loss = PolicyLossFn(algorithm, correction=correction, is_cap=1.5, kl_coef=0.1)
    logp, data = _inputs()
    toks, seqs = data.global_valid_toks(), data.global_valid_seqs()
    assert (toks, seqs) == (18.0, 5.0)
    _, base = loss(logp, data, toks, seqs)
    _, more_toks = loss(logp, data, 2 * toks, seqs)
    _, more_seqs = loss(logp, data, toks, 2 * seqs)
    declared = loss.metric_denominators()
    assert set(declared) == set(base)
    for key, unit in declared.items():
        if base[key] == 0:
            continue  # 0 / anything: the metric cannot tell its denominator
        halved = {VALID_TOKS: more_toks, VALID_SEQS: more_seqs}
        for u, metrics in halved.items():
            expected = base[key] / 2 if unit == u else base[key]
            assert metrics[key] == pytest.approx(expected, rel=1e-6), (key, unit, u)
        if unit in (MAX, MIN):
            assert more_toks[key] == more_seqs[key] == base[key]


@pytest.mark.parametrize(("algorithm", "correction"), CASES)
def test_bound_micro_batches_sum_to_the_whole_batch(algorithm, correction):
    loss = PolicyLossFn(algorithm, correction=correction, is_cap=1.5, kl_coef=0.1)
    logp, data = _inputs()
    bound = loss.bind(data)
    whole, whole_metrics = bound(logp, slice(0, 6))
    parts = [bound(logp[s], s) for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
    assert float(sum(p[0] for p in parts)) == pytest.approx(float(whole), rel=1e-6, abs=1e-7)
    combined = combine_metrics([p[1] for p in parts])
    for key, value in whole_metrics.items():
        assert combined[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_kl_term_off_without_a_reference():
    class Section:  # the fields `from_config` reads from `algorithm:`
        name, correction, clip_low, clip_high, is_cap, reduction, kl_coef, kl_kind = (
            "grpo", "none", 0.2, 0.2, 2.0, "token_mean", 0.5, "k3")

    assert PolicyLossFn.from_config(Section, with_reference=False).kl_coef == 0.0
    with_ref = PolicyLossFn.from_config(Section, with_reference=True)
    assert with_ref.kl_coef == 0.5 and "kl_to_ref" in with_ref.metric_denominators()
    logp, data = _inputs(ref=False)
    _, metrics = with_ref(logp, data, data.global_valid_toks(), data.global_valid_seqs())
    assert "kl_to_ref" not in metrics  # no reference log-probs given: no KL term
