"""Megatron backend MoE routing on CPU (one process): the trainer's own experts (flip rate, logged every
loop step), replay through megatron-core's RouterReplay (R3 and R2): equality of expert choices on every
(token, layer), equal to the torch backend's replay, micro-batching, overflow retries, gate gradients."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.mismatch import router_topk_flip_rate
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy

pytest.importorskip("megatron.core")

from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy  # noqa: E402

VOCAB = 64
MOE = {"config": {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "norm_topk_prob": True, "max_position_embeddings": 64, "rope_theta": 20000.0,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False}}
DENSE = {"config": {**MOE["config"], "model_type": "qwen3"}}


def _batch(n=6, p=5, t=6, seed=0):
    """A synthetic batch (left-padded prompts, early-ended responses) with random 'rollout' experts:
    k distinct ids per real (token, layer), -1 on padding."""
    b = synthetic_batch(VOCAB, n, p, t, seed)
    g = torch.Generator().manual_seed(seed + 7)
    first = torch.randint(0, 4, (n, t, 2, 1), generator=g)
    ex = torch.cat([first, (first + torch.randint(1, 4, first.shape, generator=g)) % 4], -1).short()
    ex[~b.response_mask.bool()] = -1
    b.rollout_experts = ex
    return b


def _mt(name="fp32", replay="none", mbs=4, **kw):
    return MegatronPolicy(MOE, PrecisionPolicy.from_name(name), lr=1e-2, micro_batch_size=mbs,
                                 router_replay=replay, **kw)


def _loss(batch):
    adv = torch.randn(batch.num_samples, 1, generator=torch.Generator().manual_seed(3))
    return lambda logp, rows: (-(adv[rows] * logp * batch.response_mask[rows]).sum() / batch.response_mask.sum(), {})


def test_own_experts_equal_the_torch_backend_fp32(mcore_cpu):
    """fp32: megatron's own top-k per response token == the HF trainer's on every real (token, layer)."""
    mt = _mt()
    tt = TorchPolicy(MOE, mt.precision, lr=1e-2)
    tt.load_state_dict({"model": mt.rollout_state_dict(), "optimizer": tt.optimizer.state_dict(), "scaler": None})
    b = _batch()
    m = b.response_mask.bool()
    own_m, own_t = mt.selected_experts(b), tt.selected_experts(b)
    assert own_m.dtype == torch.int16 and own_m.shape == b.rollout_experts.shape
    assert bool((own_m[~m] == -1).all()) and torch.equal(own_m[m], own_t[m].sort(-1).values)  # sets (HF: score order)
    assert torch.equal(mt.selected_experts(b, replayed=True), own_m)  # no replay: used == own


def test_r3_routes_every_token_to_the_rollout_experts_like_the_torch_backend(mcore_cpu):
    mt = _mt(replay="rollout")
    tt = TorchPolicy(MOE, mt.precision, lr=1e-2, router_replay="rollout")
    tt.load_state_dict({"model": mt.rollout_state_dict(), "optimizer": tt.optimizer.state_dict(), "scaler": None})
    b = _batch()
    m = b.response_mask.bool()
    lp = mt.logprobs(b, 1.0)
    own, used = mt.selected_experts(b), mt.selected_experts(b, replayed=True)
    assert router_topk_flip_rate(own, b.rollout_experts, m) > 0.5  # random targets: most sets differ
    assert torch.equal(used[m], b.rollout_experts[m].sort(-1).values)  # every (token, layer) replayed
    # the same replay semantics as the HF routers (weights = the trainer's renormalised probabilities)
    torch.testing.assert_close(lp[m], tt.logprobs(b, 1.0)[m], atol=2e-5, rtol=0)
    mt.router_replay = "none"
    assert not torch.allclose(mt.logprobs(b, 1.0)[m], lp[m], atol=1e-3)


def test_r3_survives_micro_batching_and_overflow_retries(mcore_cpu):
    big, small = _mt("fp16", "rollout", mbs=6), _mt("fp16", "rollout", mbs=4)
    b = _batch()
    m = b.response_mask.bool()
    ref = big.logprobs(b, 1.0)
    assert torch.equal(small.logprobs(b, 1.0), ref)
    seen = []
    loss = _loss(b)

    def loss_fn(logp, rows):  # the experts each training micro-batch's forward used
        n, s = rows.stop - rows.start, b.input_ids.shape[1]
        used = small.routing.collect("used", n, s)[:, b.prompt_width - 1: s - 1]
        assert torch.equal(used[m[rows]], b.rollout_experts[rows][m[rows]].long().sort(-1).values)
        seen.append(logp.detach().clone())
        return loss(logp, rows)

    calls = {"n": 0}

    def overflow_once(grads):
        calls["n"] += 1
        if calls["n"] == 1:
            grads[0].view(-1)[0] = float("inf")

    small.grad_hook = overflow_once
    small.routing.recording = True
    assert small.train_step(b, loss_fn, 1.0).skipped
    assert not small.train_step(b, loss_fn, 1.0).skipped  # the retry: same batch, same routing
    small.routing.recording = False
    assert len(seen) == 4
    assert torch.equal(torch.cat(seen[:2])[m], ref[m]) and torch.equal(torch.cat(seen[2:])[m], ref[m])


def test_gate_gets_gradients_with_replay(mcore_cpu):
    mt = _mt("bf16", "rollout")
    b = _batch()
    grads = {}

    def hook(_):
        grads.update({n: p.grad.clone() for n, p in mt.master.named_parameters() if n.endswith("router.weight")})

    mt.grad_hook = hook
    before = {n: p.detach().clone() for n, p in mt.master.named_parameters() if n.endswith("router.weight")}
    assert not mt.train_step(b, _loss(b), 1.0).skipped
    assert len(grads) == 2 and all(float(g.abs().sum()) > 0 for g in grads.values())
    assert all(not torch.equal(p.detach(), before[n]) for n, p in mt.master.named_parameters() if n in before)


def test_r2_replays_the_old_logprob_pass_in_every_update(mcore_cpu):
    """R2: the update passes (each micro-batch, two updates) route as the old-logprob pass did, so the
    first update's log-probs equal the old ones bit for bit although the rollout's experts differ."""
    mt = _mt("bf16", "trainer", mbs=4)
    b = _batch()
    m = b.response_mask.bool()
    with pytest.raises(ValueError, match="no old-logprob pass recorded"):
        mt.train_step(b, _loss(b), 1.0)
    old = mt.logprobs(b, 1.0)
    recorded = mt.selected_experts(b, replayed=True)
    assert torch.equal(recorded, mt.selected_experts(b))  # the old-logprob pass routes by its own gate
    seen, used = [], []
    loss = _loss(b)

    def loss_fn(logp, rows):
        n, s = rows.stop - rows.start, b.input_ids.shape[1]
        used.append(mt.routing.collect("used", n, s)[:, b.prompt_width - 1: s - 1])
        seen.append(logp.detach().clone())
        return loss(logp, rows)

    mt.routing.recording = True
    for _ in range(2):
        assert not mt.train_step(b, loss_fn, 1.0).skipped
    mt.routing.recording = False
    assert torch.equal(torch.cat(seen[:2])[m], old[m])
    for step in (used[:2], used[2:]):
        assert torch.equal(torch.cat(step)[m], recorded[m].long())


def test_replay_refusals(mcore_cpu):
    with pytest.raises(ValueError, match="allowed: none, rollout, trainer"):
        _mt(replay="r3")
    with pytest.raises(ValueError, match="dense"):
        MegatronPolicy(DENSE, PrecisionPolicy.from_name("fp32"), lr=1e-2, router_replay="rollout")
    mt = _mt(replay="rollout")
    b = _batch()
    b.rollout_experts = None
    with pytest.raises(ValueError, match="carries no rollout_experts"):
        mt.logprobs(b, 1.0)


@pytest.mark.parametrize("replay", ["none", "rollout"])
def test_rl_loop_logs_the_flip_rate_every_step_with_the_megatron_trainer(mcore_cpu, tmp_path, replay):
    """The loop's step (torch rollout engine, megatron trainer on CPU): flip rate and per-layer values
    every step; with R3 the update forwards use the rollout's experts."""
    from rich.console import Console

    from nemo_rl_fp16.assembly import build_run
    from nemo_rl_fp16.config import load_recipe, typed
    from nemo_rl_fp16.policy import build_policy
    from nemo_rl_fp16.trainer import RLTrainer

    rc = typed(load_recipe("moe_tiny", [f"output_dir={tmp_path}/run", "precision=bf16", "data.prompts_per_step=2",
                                        "rollout.max_new_tokens=6", "logging.progress=false",
                                        f"policy.router_replay={replay}", "algorithm.updates_per_rollout=2",
                                        "policy.micro_batch_size=3"]))
    setup = build_run(rc, Console(quiet=True))
    mrc = rc.model_copy(update={"policy": rc.policy.model_copy(update={"backend": "megatron"})})
    setup.policy = build_policy(mrc, setup.model_cfg, setup.train_policy, "cpu",
                                        setup.policy.rollout_state_dict())
    assert isinstance(setup.policy, MegatronPolicy) and setup.policy.router_replay == replay
    loop = RLTrainer(rc, setup, Console(quiet=True))
    for step in (1, 2):
        metrics = loop.step(step)
        assert 0.0 <= metrics["mismatch/router_topk_flip_rate"] <= 1.0
        assert {"mismatch/router_topk_flip_rate/layer0", "mismatch/router_topk_flip_rate/layer1"} <= set(metrics)
        json.dumps(metrics)


def test_no_router_replay_left_in_megatrons_global_registry(mcore_cpu):
    """Every model the trainer builds (bf16: an fp32 master and a compute copy) drives its own routers'
    RouterReplay; none stays in megatron-core's process-global list (which would keep the models alive)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from nemo_rl_fp16.policy.megatron.model import unwrap

    before = len(RouterReplay.global_router_replay_instances)
    mt = _mt("bf16", "rollout")
    assert mt.master is not mt.compute
    mine = [layer.mlp.router.router_replay for model in (mt.master, mt.compute)
            for layer in unwrap(model).decoder.layers]
    assert len(mine) == 4 and all(r is not None for r in mine)
    assert not any(r in RouterReplay.global_router_replay_instances for r in mine)
    assert len(RouterReplay.global_router_replay_instances) == before
