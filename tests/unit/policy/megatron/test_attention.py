"""Megatron attention: the `policy.attention` choice (auto/local/sdpa/te) and SDPA == megatron's local spec."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from test_policy import DENSE, _batch, _mtrainer, _weights  # noqa: E402


def test_sdpa_attention_matches_local_spec(mcore_cpu):
    _, sd = _weights(DENSE)
    b = _batch()
    ref = _mtrainer(DENSE, init=sd).logprobs(b, 1.0)
    torch.testing.assert_close(_mtrainer(DENSE, init=sd, attention="sdpa").logprobs(b, 1.0), ref, rtol=0, atol=1e-5)


def test_attention_choice_is_resolved_and_checked(monkeypatch):
    from nemo_rl_fp16.policy.megatron import attention as mp

    monkeypatch.setattr(mp, "te_available", lambda: False)
    assert mp.resolve_attention("auto", cuda=False) == "local"
    assert mp.resolve_attention("auto", cuda=True) == "sdpa"
    assert mp.resolve_attention("sdpa", cuda=False) == "sdpa"
    with pytest.raises(ValueError, match="needs CUDA and transformer_engine"):
        mp.resolve_attention("te", cuda=True)
    with pytest.raises(ValueError, match="must be one of"):
        mp.resolve_attention("flash", cuda=True)
    monkeypatch.setattr(mp, "te_available", lambda: True)
    assert mp.resolve_attention("auto", cuda=True) == "te"
    assert mp.resolve_attention("auto", cuda=False) == "local"
