import math

import pytest
import torch

from nemo_rl_fp16.algorithms import group_advantages


def test_hand_case_normalized():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    adv = group_advantages(r, 3, eps=0.0)
    # group 1: mean 2, unbiased std 1; group 2: mean 4/3, std sqrt(((4/3)^2*2 + (8/3)^2)/2)
    std2 = math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 2)
    expected = [-1.0, 0.0, 1.0, -4 / 3 / std2, -4 / 3 / std2, 8 / 3 / std2]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_eps_and_unnormalized():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0])
    std = torch.tensor([0.0, 1.0]).std()  # sqrt(0.5)
    torch.testing.assert_close(group_advantages(r, 2, eps=0.5)[:2],
                               torch.tensor([-0.5, 0.5]) / (std + 0.5))
    torch.testing.assert_close(group_advantages(r, 2, normalize_std=False),
                               torch.tensor([-0.5, 0.5, 0.0, 0.0]))


def test_random_matches_formula():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(40, generator=g, dtype=torch.float64)
    adv = group_advantages(r, 8)
    grp = r.view(5, 8)
    expected = (grp - grp.mean(1, keepdim=True)) / (grp.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(adv, expected.view(-1))
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv.view(5, 8).sum(1), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("normalize_std", [True, False])
def test_all_equal_and_group_size_one_give_exact_zeros(normalize_std):
    for r, gs in ((torch.full((9,), 0.1), 3), (torch.tensor([0.3, 1.0, 7.0]), 1)):
        adv = group_advantages(r, gs, normalize_std=normalize_std)
        assert torch.equal(adv, torch.zeros_like(adv))


def test_int_and_bool_rewards_are_accepted():
    adv = group_advantages(torch.tensor([1, 0, 1, 1]), 2)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert adv[0] > 0 > adv[1] and adv[2] == adv[3] == 0
    assert torch.equal(group_advantages(torch.tensor([True, False]), 2, normalize_std=False),
                       torch.tensor([0.5, -0.5]))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
