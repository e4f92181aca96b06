import math

import numpy as np
import pytest
import torch

from nemo_rl_fp16.mismatch import bucket_edges, mismatch_metrics, router_topk_flip_rate

TRAIN = [[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]
ROLL = [[-1.2, -1.5, -0.5, 9.0], [-0.1, -0.9, 0.0, 0.0], [-3.0, -3.0, -3.0, -3.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def k3(xs):
    return sum(math.exp(x) - 1 - x for x in xs) / len(xs)


def test_hand_case():
    out = mismatch_metrics(torch.tensor(TRAIN), torch.tensor(ROLL), torch.tensor(MASK),
                           length_buckets=(2, 3))
    row0, row1 = [0.2, -0.5, 0.0], [-0.2, 0.2]  # train - rollout on masked tokens
    toks = row0 + row1
    seqs = [sum(row0), sum(row1)]  # the empty third row is not a sequence
    seq_mean = sum(seqs) / 2
    expected = {
        "mismatch/kl_k1": -sum(toks) / 5,
        "mismatch/kl_k2": sum(0.5 * x * x for x in toks) / 5,
        "mismatch/kl_k3": k3(toks),
        "mismatch/abs_logratio_mean": sum(abs(x) for x in toks) / 5,
        "mismatch/abs_logratio_max": 0.5,
        "mismatch/seq_logratio_mean": seq_mean,
        "mismatch/seq_logratio_std": math.sqrt(sum((s - seq_mean) ** 2 for s in seqs) / 2),
        "mismatch/is_ratio_max": math.exp(0.2),
        "mismatch/kl_by_length/1-2": k3(row1),
        "mismatch/kl_by_length/3-3": k3(row0),
        "mismatch/is_ratio_std": float(np.std([math.exp(x) for x in toks])),
        "mismatch/mis_masked_frac": 0.0,  # sequence ratios exp(-0.3), exp(0) are below the cap 2
        "mismatch/n_tokens": 5.0,
        "mismatch/tokens_by_length/1-2": 2.0,
        "mismatch/tokens_by_length/3-3": 3.0,
    }
    assert set(out) == set(expected)  # "4-inf" holds no sequence, so it is absent
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert all(type(v) is float for v in out.values())
    capped = mismatch_metrics(torch.tensor(TRAIN), torch.tensor(ROLL), torch.tensor(MASK), is_cap=0.8)
    assert capped["mismatch/mis_masked_frac"] == 0.5  # exp(0) = 1 > 0.8; exp(-0.3) = 0.74 is not


def test_numpy_inputs_default_buckets_and_direction():
    out = mismatch_metrics(np.array(TRAIN, dtype=np.float32), np.array(ROLL), np.array(MASK))
    assert "mismatch/kl_by_length/1-64" in out and len([k for k in out if "kl_by_length" in k]) == 1
    # KL(mu||pi) with p = pi: swapping the arguments flips the sign of k1
    swapped = mismatch_metrics(np.array(ROLL), np.array(TRAIN), np.array(MASK))
    assert swapped["mismatch/kl_k1"] == pytest.approx(-out["mismatch/kl_k1"], abs=1e-6)


def test_identical_and_empty():
    x = torch.randn(4, 6)
    out = mismatch_metrics(x, x.clone(), torch.ones(4, 6))
    assert out["mismatch/kl_k3"] == 0 and out["mismatch/abs_logratio_max"] == 0
    assert out["mismatch/is_ratio_max"] == 1.0 and out["mismatch/seq_logratio_std"] == 0
    empty = mismatch_metrics(x, x + 1, torch.zeros(4, 6))
    assert not any("by_length" in k for k in empty)
    assert empty["mismatch/kl_k1"] == 0.0 and empty["mismatch/is_ratio_max"] == 1.0


def test_huge_log_ratios_stay_finite():
    train = torch.tensor([[-0.1, -0.2], [-0.3, -0.4]])
    roll = torch.tensor([[-1e4, -0.2], [-0.3, 1e4]])
    out = mismatch_metrics(train, roll, torch.ones(2, 2), length_buckets=(1, 2))
    assert all(math.isfinite(v) for v in out.values())
    assert out["mismatch/is_ratio_max"] == pytest.approx(math.exp(700.0))
    assert out["mismatch/abs_logratio_max"] == pytest.approx(1e4 + 0.4, rel=1e-6)


def test_bucket_edges_and_validation():
    assert bucket_edges((4, 8)) == [(1, 4.0, "1-4"), (5, 8.0, "5-8"), (9, math.inf, "9-inf")]
    for bad in ((), (8, 4), (0, 4), (4, 4), (2.5,)):
        with pytest.raises(ValueError, match="length_buckets"):
            mismatch_metrics(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                             length_buckets=bad)
    with pytest.raises(ValueError, match="shape"):
        mismatch_metrics(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


def test_router_topk_flip_rate_hand_case():
    train = torch.tensor([[[[1, 2], [3, 4]], [[0, 1], [2, 3]], [[5, 6], [7, 8]]]])
    roll = torch.tensor([[[[2, 1], [3, 5]], [[0, 1], [3, 2]], [[0, 0], [0, 0]]]])
    mask = torch.tensor([[1, 1, 0]])
    # t0: layer0 same set (order ignored), layer1 differs; t1: both same; t2 masked.
    assert router_topk_flip_rate(train, roll, mask) == pytest.approx(1 / 4)
    assert router_topk_flip_rate(train, train, mask) == 0.0
    assert router_topk_flip_rate(train, roll, torch.zeros(1, 3)) == 0.0
    logp = torch.zeros(1, 3)
    out = mismatch_metrics(logp, logp, mask, train_experts=train, rollout_experts=roll)
    assert out["mismatch/router_topk_flip_rate"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="both"):
        mismatch_metrics(logp, logp, mask, train_experts=train)
    with pytest.raises(ValueError, match="layers, k"):
        router_topk_flip_rate(train[..., 0], roll[..., 0], mask)

