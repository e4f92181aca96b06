"""Sequence packing (`policy.sequence_packing`): sorted micro-batches in the compact layout.

Log-probs and a train step with packing equal the unpacked ones to fp32 rounding, in the original
row order, on both backends. Tolerance: each row's positions and causal context are unchanged, only
the kernels' shapes differ (attention over another key count, GEMMs over another row count), so the
difference is reduction-order rounding: a few ulps of fp32 (1.2e-7 relative) summed over the ~60
keys/features of these tiny models; 1e-5 absolute on log-probs of magnitude ~4 (ln 64) is ~100x
that and ~1e4x smaller than any misplaced row or shifted column (whose log-probs differ by O(1)).
"""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop
from nemo_rl_fp16.policy.packing import compact, packed_slices, real_lengths, uncompact
from nemo_rl_fp16.precision import PrecisionPolicy

VOCAB = 64
DENSE = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 64, "rope_theta": 5000.0, "tie_word_embeddings": False}}
FP32 = PrecisionPolicy.from_name("fp32")
ATOL = 1e-5  # module doc


def ragged(n=12, p=7, t=11, seed=0) -> RolloutBatch:
    """Random prompt/response lengths in random order (prompts left-padded, responses right-padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, p + t), generator=g)
    prompt = torch.randint(1, p + 1, (n,), generator=g)
    response = torch.randint(1, t + 1, (n,), generator=g)
    col_p, col_t = torch.arange(p)[None, :], torch.arange(t)[None, :]
    attn = torch.cat([(col_p >= p - prompt[:, None]), (col_t < response[:, None])], 1).long()
    resp = attn[:, p:].clone()
    ids[attn == 0] = 0
    experts = torch.randint(0, 4, (n, t, 2, 2), generator=g).short()
    experts[resp == 0] = -1
    return RolloutBatch(input_ids=ids, attention_mask=attn, response_mask=resp,
                        rollout_logp=torch.randn(n, t, generator=g) * resp, prompt_width=p,
                        prompt_index=torch.arange(n) // 2, rollout_experts=experts)


def test_compact_layout_left_aligns_every_row_and_uncompact_inverts_it():
    b = ragged()
    prompt, response = real_lengths(b)
    c = compact(b)
    cb = c.batch
    assert cb.input_ids.shape[1] == int((prompt + response).max()) < b.input_ids.shape[1]
    assert cb.prompt_width == int(prompt.min())
    for i in range(b.num_samples):
        real = b.input_ids[i][b.attention_mask[i].bool()]
        n = real.numel()
        assert torch.equal(cb.input_ids[i, :n], real) and cb.attention_mask[i, :n].all()
        assert not cb.attention_mask[i, n:].any()
        # response token j of row i sits at compact column p_i + j, response index offsets[i] + j
        off = int(c.offsets[i])
        assert off == int(prompt[i]) - cb.prompt_width
        r = int(response[i])
        assert torch.equal(cb.response_mask[i, off:off + r], b.response_mask[i, :r])
        assert cb.response_mask[i].sum() == r
        assert torch.equal(cb.rollout_logp[i, off:off + r], b.rollout_logp[i, :r])
        assert torch.equal(cb.rollout_experts[i, off:off + r], b.rollout_experts[i, :r])
        assert (cb.rollout_experts[i, :off] == -1).all()  # prompt positions: the router's own choice
    # a scorer's per-column value comes back at the row's own response columns
    cols = torch.arange(cb.input_ids.shape[1] - cb.prompt_width, dtype=torch.float32)
    back = uncompact(cols.expand(b.num_samples, -1).clone(), c)
    want = torch.arange(b.response_mask.shape[1])[None, :] + c.offsets[:, None]
    assert torch.equal(back[b.response_mask.bool()], want.float()[b.response_mask.bool()])


def test_compact_refuses_a_response_mask_past_the_real_tokens():
    b = ragged()
    i = int((b.attention_mask[:, b.prompt_width:].sum(-1) < 11).nonzero()[0])
    b.response_mask[i, -1] = 1
    with pytest.raises(ValueError, match="response_mask is 1 on a column past"):
        compact(b)


def test_packed_slices_sort_a_ranks_own_rows_into_the_same_count_on_every_rank():
    b = ragged(n=12)
    lengths = b.attention_mask.sum(-1)
    counts = []
    for span in (slice(0, 6), slice(6, 12)):  # two data-parallel ranks, different length mixes
        mbs = list(packed_slices(b, span, 4))
        counts.append(len(mbs))
        rows = torch.cat(mbs)
        assert sorted(rows.tolist()) == list(range(span.start, span.stop))  # its own rows, each once
        assert (lengths[rows][1:] <= lengths[rows][:-1]).all()  # longest first
    assert counts == [2, 2]


def _policy(packing: bool, mbs: int = 3) -> TorchPolicy:
    return TorchPolicy(DENSE, FP32, lr=1e-2, micro_batch_size=mbs, seed=2, sequence_packing=packing)


def test_torch_packed_logprobs_equal_unpacked_in_original_order():
    b = ragged()
    on, off = _policy(True), _policy(False)
    assert on.loop.packing and not off.loop.packing
    # the packed micro-batches really are permuted rows
    assert any(not torch.equal(r, torch.arange(int(r[0]), int(r[0]) + r.numel()))
               for r in on.loop.local_micro_batches(b))
    a, c = on.logprobs(b, 0.8), off.logprobs(b, 0.8)
    assert a.shape == c.shape == b.response_mask.shape
    assert torch.equal(a == 0, c == 0)  # masked columns are 0 in both
    torch.testing.assert_close(a, c, atol=ATOL, rtol=0)
    # each row individually (one row, one micro-batch: no neighbours at all) agrees too
    single = _policy(False, mbs=1).logprobs(b, 0.8)
    torch.testing.assert_close(a, single, atol=ATOL, rtol=0)


def _loss(batch):
    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(1))
    mask = batch.response_mask.float()
    seen = []

    def fn(logp, rows):
        seen.append(rows)
        return -(logp * adv[rows, None] * mask[rows]).sum() / mask.sum(), {"lp": (logp * mask[rows]).sum()}

    return fn, seen


def test_torch_packed_train_step_same_loss_and_grad_norm():
    b = ragged()
    res = {}
    for packing in (True, False):
        tr = _policy(packing)
        fn, seen = _loss(b)
        r = tr.train_step(b, fn, 0.8)
        res[packing] = (r, tr.rollout_state_dict())
        if packing:
            assert all(isinstance(x, torch.Tensor) for x in seen)  # original row indices reach the loss
            assert sorted(torch.cat(seen).tolist()) == list(range(b.num_samples))
    (on, w_on), (off, w_off) = res[True], res[False]
    assert not on.skipped and not off.skipped
    assert on.metrics["loss"] == pytest.approx(off.metrics["loss"], rel=1e-5, abs=1e-7)
    assert on.grad_norm == pytest.approx(off.grad_norm, rel=1e-5)
    assert on.metrics["lp"] == pytest.approx(off.metrics["lp"], rel=1e-5)
    # AdamW's first step moves each weight by ~lr * sign(g): a near-zero gradient element's rounding can
    # move its update by a sizeable fraction of lr (1e-2); 1e-4 = lr / 100 still catches a wrong row or column
    for k in w_on:
        torch.testing.assert_close(w_on[k], w_off[k], atol=1e-4, rtol=0)


def test_reference_policy_honours_sequence_packing():
    from nemo_rl_fp16.policy.reference import _torch_reference

    ref = _torch_reference(DENSE, FP32, micro_batch_size=3, seed=2, device="cpu", init=None, router_replay="none",
                           sequence_packing=True)
    assert isinstance(ref.loop, MicroBatchLoop) and ref.loop.packing
    b = ragged()
    torch.testing.assert_close(ref.logprobs(b, 1.0), _policy(False).logprobs(b, 1.0), atol=ATOL, rtol=0)


def test_megatron_packed_equals_unpacked(mcore_cpu):
    from conftest import reset_megatron

    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

    def run(packing):
        reset_megatron()
        tr = MegatronPolicy(DENSE, FP32, lr=1e-2, micro_batch_size=3, seed=2, sequence_packing=packing)
        assert tr.loop.packing is packing
        b = ragged()
        lp = tr.logprobs(b, 0.8)
        fn, _ = _loss(b)
        r = tr.train_step(b, fn, 0.8)
        return lp, r

    (lp_on, r_on), (lp_off, r_off) = run(True), run(False)
    torch.testing.assert_close(lp_on, lp_off, atol=ATOL, rtol=0)
    assert r_on.metrics["loss"] == pytest.approx(r_off.metrics["loss"], rel=1e-5, abs=1e-7)
    assert r_on.grad_norm == pytest.approx(r_off.grad_norm, rel=1e-5)


def test_megatron_refuses_packing_with_pipeline_parallelism():
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

    with pytest.raises(ValueError, match="'policy.sequence_packing': true with policy.pipeline_parallel_size > 1"):
        MegatronPolicy(DENSE, FP32, lr=1e-2, pipeline_parallel_size=2, sequence_packing=True)


def test_validation_stage_refuses_packing_with_pipeline_parallelism_in_one_line():
    from nemo_rl_fp16.config import ConfigError, load_recipe, typed
    from nemo_rl_fp16.plan import check_run

    def refusals(*extra):
        base = ["policy.backend=megatron", "device=cuda", "cluster.gpus_per_node=2", *extra]
        try:
            check_run(typed(load_recipe("sanity_tiny", base)))
        except ConfigError as e:  # this CPU machine also refuses device=cuda: compare the lines
            return str(e).splitlines()
        return []

    assert not [x for x in refusals("policy.pipeline_parallel_size=2") if "sequence_packing" in x]
    assert not [x for x in refusals("policy.sequence_packing=true") if "sequence_packing" in x]  # PP=1
    lines = [x for x in refusals("policy.pipeline_parallel_size=2", "policy.sequence_packing=true")
             if "sequence_packing" in x]
    assert len(lines) == 1 and "set policy.sequence_packing=false" in lines[0]



def test_validation_stage_refuses_packing_where_the_cpu_moe_dispatcher_spans_dp_ranks():
    """megatron on CPU (the rehearsal mode) runs the allgather MoE dispatcher, which needs one width over an EP
    group spanning DP ranks (EP > TP): packing there is refused before any work (it failed inside the Ray actor)."""
    from nemo_rl_fp16.config import ConfigError, load_recipe, typed
    from nemo_rl_fp16.plan import check_run
    from nemo_rl_fp16.policy.packing import PACKING_WITH_CPU_EP

    def lines(*extra):
        base = ["policy.backend=megatron", "device=cpu", "cluster.ray.enabled=true", "cluster.ray.trainer_workers=2",
                "cluster.ray.layout=split", *extra]
        try:
            check_run(typed(load_recipe("moe_tiny", base)))
        except ConfigError as e:
            return [x for x in str(e).splitlines() if "sequence_packing" in x]
        return []

    assert lines("policy.expert_parallel_size=2", "policy.sequence_packing=true") == [PACKING_WITH_CPU_EP]
    assert lines("policy.expert_parallel_size=2", "policy.sequence_packing=false") == []
    assert lines("policy.expert_parallel_size=2", "policy.tensor_parallel_size=2", "policy.sequence_packing=true") == []


MOE = {"config": {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}}


def test_r3_replay_lands_on_the_same_positions_when_packed():
    """Each response token's replayed experts follow it to its compact column (`moe_routing.replay_targets`)."""
    b = ragged()
    b.rollout_experts[b.rollout_experts >= 0] = 3 - b.rollout_experts[b.rollout_experts >= 0]  # not the gate's pick
    out = {}
    for packing, replay in ((True, "rollout"), (False, "rollout"), (False, "none")):
        tr = TorchPolicy(MOE, FP32, lr=1e-2, micro_batch_size=3, seed=2, router_replay=replay,
                         sequence_packing=packing)
        fn, _ = _loss(b)
        out[packing, replay] = (tr.loop.logprobs(b, 1.0), tr.train_step(b, fn, 1.0).grad_norm)
    (lp_on, g_on), (lp_off, g_off), (lp_own, _) = out[True, "rollout"], out[False, "rollout"], out[False, "none"]
    assert (lp_off - lp_own).abs().max() > 1e-2  # replay changes the log-probs: a misplaced replay would show
    torch.testing.assert_close(lp_on, lp_off, atol=ATOL, rtol=0)
    assert g_on == pytest.approx(g_off, rel=1e-5)


def test_moe_expert_recording_pass_is_packed_and_returns_row_order():
    """The old-logprob pass of an MoE model records each response token's experts: packed, the same ids."""
    b = ragged()
    res = {}
    for packing in (True, False):
        tr = TorchPolicy(MOE, FP32, lr=1e-2, micro_batch_size=3, seed=2, sequence_packing=packing)
        widths = []
        real = tr.adapter.score
        tr.adapter.score = lambda mb, t, real=real, widths=widths: widths.append(mb.input_ids.shape[1]) or real(mb, t)
        lp = tr.logprobs(b, 1.0)  # ExpertRouting.logprobs: the recording scope around each forward
        res[packing] = (lp, tr.selected_experts(b), tr.selected_experts(b, replayed=True), widths)
    (lp_on, own_on, used_on, w_on), (lp_off, own_off, used_off, w_off) = res[True], res[False]
    assert max(w_on) < b.input_ids.shape[1] == max(w_off)  # the recording forwards ran compact
    torch.testing.assert_close(lp_on, lp_off, atol=ATOL, rtol=0)
    assert own_on.shape == own_off.shape == (*b.response_mask.shape, 2, 2)
    assert torch.equal(own_on, own_off) and torch.equal(used_on, used_off)
    assert (own_on[b.response_mask == 0] == -1).all()


def _dp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        tr = _policy(True, mbs=4)
        b = _dp_batch()
        mbs = [r.tolist() for r in tr.loop.local_micro_batches(b)]
        logp = tr.logprobs(b, 1.0)
        fn, _ = _loss(b)
        r = tr.train_step(b, fn, 1.0)
        if rank == 0:
            torch.save({"fsdp": tr._fsdp, "logp": logp, "loss": r.metrics["loss"], "grad_norm": r.grad_norm,
                        "micro": len(r.micro_metrics), "rank0_mbs": mbs}, out)
    finally:
        dist.destroy_process_group()


def _dp_batch() -> RolloutBatch:
    """12 rows: rank 0's 6 all short, rank 1's 6 spread from short to the full width."""
    b = ragged(n=12)
    keep = b.attention_mask.clone()
    keep[:6, b.prompt_width + 2:] = 0  # rank 0: responses of at most 2 tokens
    keep[:6, :b.prompt_width - 2] = 0  # and prompts of at most 2
    ids = b.input_ids * keep
    return RolloutBatch(input_ids=ids, attention_mask=keep, response_mask=keep[:, b.prompt_width:].clone(),
                        rollout_logp=b.rollout_logp * keep[:, b.prompt_width:], prompt_width=b.prompt_width,
                        prompt_index=b.prompt_index)


def test_fsdp2_two_ranks_pack_their_own_rows_in_the_same_number_of_micro_batches(tmp_path):
    """DP=2 over gloo (FSDP2): each rank sorts its own 6 rows into 2 micro-batches of <= 4 whatever their
    lengths (a different count would hang FSDP's per-micro-batch collectives); the packed log-probs and
    step match one unpacked process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_dp_worker, args=(2, port, out), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    b = _dp_batch()
    single = _policy(False, mbs=4)
    ref_logp = single.logprobs(b, 1.0)
    fn, _ = _loss(b)
    ref = single.train_step(b, fn, 1.0)
    assert got["fsdp"] and got["micro"] == 4  # 2 per rank, both ranks gathered
    assert sorted(sum(got["rank0_mbs"], [])) == list(range(6))  # rank 0 packs its own rows only
    torch.testing.assert_close(got["logp"], ref_logp, atol=ATOL, rtol=0)
    assert got["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-5, abs=1e-7)
    assert got["grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-5)


def test_megatron_moe_r3_packed_equals_unpacked(mcore_cpu):
    """Megatron MoE (RouterReplay in rotated positions): packed R3 replays every response token's rollout
    experts (recorded `used` ids == the rollout's), and log-probs, own experts and the step match unpacked."""
    from conftest import reset_megatron

    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

    b = ragged()
    first = b.rollout_experts[..., :1].long().clamp(min=0)
    ex = torch.cat([first, (first + 1 + torch.arange(first.numel()).reshape(first.shape) % 3) % 4], -1).short()
    ex[b.response_mask == 0] = -1
    b.rollout_experts = ex
    m = b.response_mask.bool()
    res = {}
    for packing in (True, False):
        reset_megatron()
        tr = MegatronPolicy(MOE, FP32, lr=1e-2, micro_batch_size=3, seed=2, router_replay="rollout",
                            sequence_packing=packing)
        lp = tr.logprobs(b, 1.0)
        own, used = tr.selected_experts(b), tr.selected_experts(b, replayed=True)
        fn, _ = _loss(b)
        res[packing] = (lp, own, used, tr.train_step(b, fn, 1.0).grad_norm)
    (lp_on, own_on, used_on, g_on), (lp_off, own_off, used_off, g_off) = res[True], res[False]
    assert torch.equal(used_on[m], ex[m].sort(-1).values)  # every (token, layer) replayed, packed
    assert torch.equal(used_on, used_off) and torch.equal(own_on, own_off)
    torch.testing.assert_close(lp_on, lp_off, atol=ATOL, rtol=0)
    assert g_on == pytest.approx(g_off, rel=1e-5)
