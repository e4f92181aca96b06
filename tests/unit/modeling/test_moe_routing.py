"""MoE routing: capture of the rollout's experts, the trainer's flip rate, rollout routing replay (R3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.mismatch import router_topk_flip_rate, router_topk_flip_rate_by_layer
from nemo_rl_fp16.plan import check_run
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.precision.cpu_numerics import cpu_numerics, package_grouped_mm
from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine

QWEN3 = {"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
         "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 64, "tie_word_embeddings": False}
QWEN2 = {"model_type": "qwen2_moe", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
         "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 4,
         "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "tie_word_embeddings": False}
MIXTRAL = {"model_type": "mixtral", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
           "num_local_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
DENSE = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13]]
EOS = [1, 2, 14, 15, 16]  # several stop ids: some rows end early, the batch keeps padding


def _pair(config, precision, replay="none", mbs=64, seed=0):
    pol = PrecisionPolicy.from_name(precision)
    engine = TorchRolloutEngine({"config": config}, pol, pad_token_id=0, eos_token_id=EOS, seed=seed)
    trainer = TorchPolicy({"config": config}, pol, lr=1e-2, micro_batch_size=mbs, seed=seed,
                                 router_replay=replay)
    return engine, trainer


def _batch(engine, n_gen=4, tokens=12, seed=3):
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=tokens, num_generations=n_gen, seed=seed))


@pytest.mark.parametrize("config", [QWEN3, QWEN2, MIXTRAL], ids=["qwen3_moe", "qwen2_moe", "mixtral"])
def test_capture_aligned_with_response_tokens(config):
    """fp32 (no rounding noise): the trainer's own routing of position P+t-1 equals the rollout's capture of
    response token t on every real token, EOS included; padding is -1."""
    engine, trainer = _pair(config, "fp32")
    batch = _batch(engine)
    e, m = batch.rollout_experts, batch.response_mask.bool()
    assert e.dtype == torch.int16 and e.shape == (*m.shape, 2, 2)
    assert (m.sum(-1) < m.shape[1]).any(), "some row must stop early (padding after EOS)"
    eos_rows = [i for i in range(len(m)) if 0 < m[i].sum() < m.shape[1]]
    assert all(int(batch.responses[i, int(m[i].sum()) - 1]) in EOS for i in eos_rows)
    assert bool((e[~m] == -1).all()) and bool(((e[m] >= 0) & (e[m] < 4)).all())
    trainer.logprobs(batch, 1.0)
    own = trainer.selected_experts(batch)
    assert own.shape == e.shape and bool((own[~m] == -1).all())
    assert torch.equal(own[m].sort(-1).values, e[m].sort(-1).values)
    # off-by-one positions would not match: the routing differs between neighbouring positions
    shifted = own[:, 1:][m[:, 1:] & m[:, :-1]].sort(-1).values
    assert not torch.equal(shifted, e[:, :-1][m[:, 1:] & m[:, :-1]].sort(-1).values)


def test_first_entry_is_the_prefill_last_prompt_position():
    engine, _ = _pair(QWEN3, "fp32")
    batch = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, num_generations=1, seed=0))
    engine.routing.recording = True
    with torch.no_grad():
        engine.model(input_ids=torch.tensor([PROMPTS[0]]))
    engine.routing.recording = False
    last = engine.routing.collect("own", 1, len(PROMPTS[0]))[0, -1]
    assert torch.equal(batch.rollout_experts[0, 0].long(), last)


def test_dense_model_has_no_experts_and_refuses_replay():
    pol = PrecisionPolicy.from_name("fp32")
    engine = TorchRolloutEngine({"config": DENSE}, pol, pad_token_id=0, eos_token_id=1)
    assert _batch(engine, n_gen=1, tokens=3).rollout_experts is None
    with pytest.raises(ValueError, match="router_replay=rollout needs an MoE model"):
        TorchPolicy({"config": DENSE}, pol, lr=1e-3, router_replay="rollout")
    with pytest.raises(ValueError, match="allowed: none, rollout, trainer"):
        TorchPolicy({"config": QWEN3}, pol, lr=1e-3, router_replay="r3")
    with pytest.raises(ValueError, match="router_replay=trainer needs an MoE model"):
        TorchPolicy({"config": DENSE}, pol, lr=1e-3, router_replay="trainer")


def test_replay_without_recorded_experts_is_refused():
    engine, trainer = _pair(QWEN3, "bf16", replay="rollout")
    batch = _batch(engine, n_gen=1, tokens=3)
    batch.rollout_experts = None
    with pytest.raises(ValueError, match="carries no rollout_experts"):
        trainer.logprobs(batch, 1.0)


def _flipping_batch(replay, mbs=64):
    """bf16 engine/trainer pair and a batch on which the trainer's own top-k differs from the rollout's."""
    for seed in range(6):
        engine, trainer = _pair(QWEN3, "bf16", replay=replay, mbs=mbs, seed=seed)
        batch = engine.generate(PROMPTS * 8, SamplingParams(max_new_tokens=24, num_generations=4, seed=seed))
        trainer.logprobs(batch, 1.0)
        if router_topk_flip_rate(trainer.selected_experts(batch), batch.rollout_experts, batch.response_mask) > 0:
            return engine, trainer, batch
    pytest.fail("no bf16 expert flip in 6 seeds")


def test_replay_routes_every_token_to_the_rollout_experts():
    _, trainer, batch = _flipping_batch("rollout")
    m = batch.response_mask.bool()
    own, used = trainer.selected_experts(batch), trainer.selected_experts(batch, replayed=True)
    assert router_topk_flip_rate(own, batch.rollout_experts, m) > 0  # measured before replay
    assert torch.equal(used[m], batch.rollout_experts[m].to(used.dtype))  # every (token, layer)
    # without replay the same trainer (same weights) routes by its own choice and scores differently
    with_replay = trainer.logprobs(batch, 1.0)
    trainer.router_replay = "none"
    without = trainer.logprobs(batch, 1.0)
    assert torch.equal(trainer.selected_experts(batch, replayed=True)[m], own[m])
    assert not torch.equal(with_replay, without)


def test_replay_survives_micro_batching_and_retries():
    _, big, batch = _flipping_batch("rollout", mbs=128)
    small = TorchPolicy({"config": QWEN3}, big.precision, lr=1e-2, micro_batch_size=3, router_replay="rollout")
    small.load_state_dict(big.state_dict())  # the same weights (the flipping batch's seed may differ)
    ref = big.logprobs(batch, 1.0)
    assert torch.equal(small.logprobs(batch, 1.0), ref)  # rows are routed alike whatever the micro-batch
    seen = []

    def loss_fn(logp, rows):
        s = batch.input_ids.shape[1]
        used = small.routing.collect("used", rows.stop - rows.start, s)[:, batch.prompt_width - 1: s - 1]
        mb_m = batch.response_mask[rows].bool()
        assert torch.equal(used[mb_m].short(), batch.rollout_experts[rows][mb_m])
        seen.append(logp.detach().clone())
        return (logp * batch.response_mask[rows]).sum() / batch.response_mask.sum(), {}

    small.routing.recording = True  # lets the loss read the experts each micro-batch's forward used
    first = {"n": 0}

    def overflow_once(grads):
        if first["n"] == 0:
            grads[0].view(-1)[0] = float("inf")
        first["n"] += 1

    small.grad_hook = overflow_once
    assert small.train_step(batch, loss_fn, 1.0).skipped  # an overflowed attempt: weights untouched
    assert not small.train_step(batch, loss_fn, 1.0).skipped  # the retry on the same batch
    small.routing.recording = False
    n_mb = -(-batch.num_samples // 3)
    assert len(seen) == 2 * n_mb
    m = batch.response_mask.bool()
    assert torch.equal(torch.cat(seen[:n_mb])[m], ref[m]) and torch.equal(torch.cat(seen[n_mb:])[m], ref[m])


def test_gate_gets_gradients_with_replay():
    _, trainer, batch = _flipping_batch("rollout")
    grads = {}

    def hook(_):
        for name, p in trainer.master.named_parameters():
            if name.endswith("mlp.gate.weight"):
                grads[name] = p.grad.clone()

    trainer.grad_hook = hook
    adv = torch.randn(batch.num_samples, 1)
    before = {n: p.detach().clone() for n, p in trainer.master.named_parameters() if n.endswith("mlp.gate.weight")}
    result = trainer.train_step(batch, lambda logp, rows: (-(adv[rows] * logp * batch.response_mask[rows]).sum()
                                                          / batch.response_mask.sum(), {}), 1.0)
    assert not result.skipped and len(grads) == 2
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    assert all(not torch.equal(p.detach(), before[n]) for n, p in trainer.master.named_parameters() if n in before)


def test_r2_replays_the_old_logprob_pass_in_every_update():
    """R2 (`policy.router_replay=trainer`): the old-logprob pass routes by the trainer's own gate and records
    it; every update forward (each micro-batch, an overflowed attempt and its retry, a second update) routes
    the response tokens the same way, so the first attempt's log-probs equal the old ones bit for bit."""
    engine, trainer = _pair(QWEN3, "fp16", replay="trainer", mbs=5)
    batch = _batch(engine)
    m = batch.response_mask.bool()
    with pytest.raises(ValueError, match="no old-logprob pass recorded"):
        trainer.train_step(batch, lambda logp, rows: (logp.sum(), {}), 1.0)
    old = trainer.logprobs(batch, 1.0)
    recorded = trainer.selected_experts(batch, replayed=True)
    assert torch.equal(recorded, trainer.selected_experts(batch))  # no replay in the old-logprob pass
    seen, used = [], []

    def loss_fn(logp, rows):
        s = batch.input_ids.shape[1]
        used.append(trainer.routing.collect("used", rows.stop - rows.start, s)[:, batch.prompt_width - 1: s - 1])
        seen.append(logp.detach().clone())
        return -(logp * batch.response_mask[rows]).sum() / batch.response_mask.sum(), {}

    calls = {"n": 0}

    def overflow_once(grads):
        calls["n"] += 1
        if calls["n"] == 1:
            grads[0].view(-1)[0] = float("inf")

    trainer.grad_hook = overflow_once
    trainer.routing.recording = True
    results = [trainer.train_step(batch, loss_fn, 1.0) for _ in range(3)]  # overflow, retry, second update
    trainer.routing.recording = False
    assert [r.skipped for r in results] == [True, False, False]
    n_mb = -(-batch.num_samples // 5)
    assert len(used) == 3 * n_mb
    assert torch.equal(torch.cat(seen[:n_mb])[m], old[m]) and torch.equal(torch.cat(seen[n_mb:2 * n_mb])[m], old[m])
    for i in range(3):
        assert torch.equal(torch.cat(used[i * n_mb:(i + 1) * n_mb])[m].sort(-1).values, recorded[m].long().sort(-1).values)
    # the rollout's experts are untouched (the loop's flip rate still compares them with the trainer's own)
    assert batch.rollout_experts is not None and "router_replay_source" not in batch.extras


def _dp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        engine, r3 = _pair(QWEN3, "bf16", replay="rollout", mbs=3)
        batch = _batch(engine)
        res = {"r3_logp": r3.logprobs(batch, 1.0), "r3_used": r3.selected_experts(batch, replayed=True),
               "batch": batch}
        r2 = TorchPolicy({"config": QWEN3}, r3.precision, lr=1e-2, micro_batch_size=3, router_replay="trainer")
        old = r2.logprobs(batch, 1.0)
        seen = []
        r2.train_step(batch, lambda logp, rows: (seen.append((rows, logp.detach().clone())) or logp.sum() * 0, {}), 1.0)
        res.update(r2_old=old, r2_seen=seen, r2_used=r2.selected_experts(batch, replayed=True))
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_replay_survives_the_data_parallel_split(tmp_path):
    """FSDP2 over gloo, 2 ranks, each on half the rows: R3 routes every rank's rows to their own rollout
    experts (gathered log-probs and used experts equal one process's), R2's update passes on each rank's
    half replay what the old-logprob pass recorded for those rows."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.start_processes(_dp_worker, args=(2, port, out), nprocs=2, start_method="spawn")
    got = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    batch = got[0]["batch"]
    m = batch.response_mask.bool()
    _, single = _pair(QWEN3, "bf16", replay="rollout", mbs=3)
    ref = single.logprobs(batch, 1.0)
    for g in got:
        assert torch.equal(g["r3_used"][m], batch.rollout_experts[m])
        torch.testing.assert_close(g["r3_logp"], ref, rtol=0, atol=1e-6)
        assert torch.equal(g["r2_used"], got[0]["r2_used"])  # gathered: the full batch on every rank
    for rank, g in enumerate(got):
        rows_seen = [rows for rows, _ in g["r2_seen"]]
        half = batch.num_samples // 2
        assert rows_seen[0].start == rank * half and rows_seen[-1].stop == (rank + 1) * half
        for rows, logp in g["r2_seen"]:  # the first update pass == the old-logprob pass on those rows
            assert torch.equal(logp[m[rows]], g["r2_old"][rows][m[rows]])


def test_flip_rate_by_layer():
    a = torch.tensor([[[[0, 1], [2, 3]], [[0, 1], [2, 3]]]])  # [1, 2 tokens, 2 layers, k=2]
    b = torch.tensor([[[[1, 0], [2, 1]], [[0, 2], [-1, -1]]]])
    m = torch.tensor([[1, 1]])
    assert router_topk_flip_rate_by_layer(a, b, m) == [0.5, 1.0]
    assert router_topk_flip_rate(a, b, m) == 0.75
    assert router_topk_flip_rate_by_layer(a, b, torch.tensor([[1, 0]])) == [0.0, 1.0]


def test_package_grouped_mm_is_one_package_gemm_per_expert():
    a = torch.randn(7, 16).to(torch.bfloat16)
    b = torch.randn(3, 16, 5).to(torch.bfloat16)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    with cpu_numerics("cpu", torch.bfloat16):
        y = F.grouped_mm(a, b, offs=offs)
    ref = torch.cat([a[:2].double() @ b[0].double(), a[2:].double() @ b[2].double()]).to(torch.bfloat16)
    assert torch.equal(y, ref)
    with pytest.raises(NotImplementedError, match="grouped_mm"):
        package_grouped_mm(a, b[0])


def _cfg(tmp_path, *overrides):
    return load_recipe("moe_tiny", [f"output_dir={tmp_path}/run", "trainer.max_steps=2", "logging.progress=false",
                                    "logging.tensorboard=false", "data.prompts_per_step=4", "rollout.max_new_tokens=8",
                                    "trainer.resume=never", *overrides])


MEGATRON_GPU = ["policy.backend=megatron", "device=cuda", "cluster.gpus_per_node=1"]


@pytest.mark.parametrize("replay,overrides,match", [
    ("rollout", ["rollout.backend=vllm"], "rollout.backend=vllm"),
    ("rollout", [*MEGATRON_GPU, "cluster.gpus_per_node=2", "policy.tensor_parallel_size=2",
                 "policy.sequence_parallel=true"], "sequence_parallel"),
    ("rollout", ["model.config.model_type=qwen2"], "dense model"),
    ("trainer", ["model.config.model_type=qwen2"], "dense model"),
])
def test_plan_refuses_replay(tmp_path, replay, overrides, match):
    from nemo_rl_fp16.plan import router_replay_problems

    problems = router_replay_problems(typed(_cfg(tmp_path, f"policy.router_replay={replay}", *overrides)))
    assert len(problems) == 1 and match in problems[0] and "policy.router_replay" in problems[0]
    if "device=cuda" not in overrides:  # the validation stage refuses it before any work (exit 2)
        with pytest.raises(ConfigError, match=match):
            check_run(typed(_cfg(tmp_path, f"policy.router_replay={replay}", *overrides)))


@pytest.mark.parametrize("replay,overrides", [
    ("rollout", MEGATRON_GPU),  # megatron-core's RouterReplay (tests/unit/policy/megatron/test_routing.py)
    ("trainer", MEGATRON_GPU),
    ("trainer", ["rollout.backend=vllm"]),  # R2 needs no rollout experts
])
def test_plan_accepts_replay(tmp_path, replay, overrides):
    from nemo_rl_fp16.plan import router_replay_problems

    assert router_replay_problems(typed(_cfg(tmp_path, f"policy.router_replay={replay}", *overrides))) == []


