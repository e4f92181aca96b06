"""Sequence parallelism: forward widths padded to a multiple of TP (log-probs unchanged), and SP refused
where the layer spec cannot run it, in the same line by the dry run and by the build.

Sequence parallelism itself cannot be built on CPU (the local spec's `WrappedTorchNorm` asserts),
so the padding is exercised by setting `MegatronCausalLM.pad_multiple` (what SP at TP 4 sets) on
a CPU model and checking the widths the `GPTModel` sees and the log-probs/experts it returns.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.plan import make_plan

pytest.importorskip("megatron.core")

from test_policy import DENSE, MOE, _batch, _mtrainer, _weights  # noqa: E402

from nemo_rl_fp16.policy.megatron.attention import te_available  # noqa: E402
from nemo_rl_fp16.policy.megatron.model import unwrap  # noqa: E402
from nemo_rl_fp16.policy.megatron.sequence_parallel import padded_width, sequence_parallel_problem  # noqa: E402


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_widths_padded_to_tp_multiple_leave_logprobs_unchanged(mcore_cpu, cfg):
    _, sd = _weights(cfg)
    tr = _mtrainer(cfg, init=sd, micro_batch_size=4)
    seen = []
    unwrap(tr.compute.module).register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]),
                                                        with_kwargs=True)
    for t in (6, 7, 8, 9):  # widths P + T = 11, 12, 13, 14: every residue mod 4
        b = _batch(t=t)
        tr.compute.pad_multiple = 1
        ref = tr.logprobs(b, 0.8)
        ref_ex = tr.selected_experts(b) if cfg is MOE else None
        seen.clear()
        tr.compute.pad_multiple = 4  # sequence parallel at TP 4
        lp = tr.logprobs(b, 0.8)
        assert seen and all(w % 4 == 0 and w == padded_width(b.input_ids.shape[1], 4) for w in seen), seen
        assert lp.shape == ref.shape
        # trailing masked tokens cannot reach earlier ones; not bitwise: the wider matmuls block differently
        torch.testing.assert_close(lp, ref, rtol=0, atol=1e-6)
        if ref_ex is not None:
            assert torch.equal(tr.selected_experts(b), ref_ex)


def test_sp_refusal_rules():
    assert sequence_parallel_problem(sequence_parallel=False, tp=1, attention="local") is None
    assert sequence_parallel_problem(sequence_parallel=True, tp=4, attention="te") is None
    tp1 = sequence_parallel_problem(sequence_parallel=True, tp=1, attention="te")
    assert "policy.tensor_parallel_size=1" in tp1 and "sequence_parallel=false" in tp1
    local = sequence_parallel_problem(sequence_parallel=True, tp=2, attention="sdpa")
    assert "WrappedTorchNorm" in local and "sequence_parallel=false" in local and "\n" not in local
    if te_available():  # TE there, the recipe asked for another spec: a bad value
        assert "'policy.sequence_parallel': true" in local
    else:  # the environment lacks TE: said as the dry run's other environment refusals are
        assert local.startswith("policy.sequence_parallel=true needs Transformer Engine") and \
            "which is not installed;" in local
    assert [padded_width(w, 4) for w in (11, 12, 13, 14)] == [12, 12, 16, 16]


@pytest.mark.skipif(te_available(), reason="Transformer Engine present: the TE spec runs sequence parallelism")
def test_dry_run_and_build_refuse_sp_without_te_in_the_same_line(mcore_cpu):
    over = ["device=cuda", "policy.backend=megatron", "cluster.gpus_per_node=2", "policy.tensor_parallel_size=2",
            "policy.attention=sdpa", "policy.sequence_parallel=true"]
    rc = typed(load_recipe("sanity_tiny", over))
    with pytest.raises(ConfigError) as plan_err:
        make_plan(rc)
    line = str(plan_err.value)
    assert line.count("\n") == 0 and "policy.sequence_parallel=true needs Transformer Engine" in line, line
    with pytest.raises(ValueError) as build_err:  # refused before any parallel state or model is built
        _mtrainer(DENSE, tensor_parallel_size=2, sequence_parallel=True, attention="sdpa")
    assert str(build_err.value) == line
    # TP 1: the same agreement (megatron would silently drop it)
    with pytest.raises(ConfigError) as plan_err:
        make_plan(typed(load_recipe("sanity_tiny", [*over[:3], "policy.sequence_parallel=true"])))
    with pytest.raises(ValueError) as build_err:
        _mtrainer(DENSE, sequence_parallel=True)
    assert str(build_err.value) == str(plan_err.value)
