"""TorchPolicy: fp32 master + low-precision compute copy, loss scaling with overflow skip,
exact checkpoint round trip, audit."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.interfaces import PolicyEngine, RolloutBatch
from nemo_rl_fp16.modeling import logprobs as logprobs_module
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy

VOCAB = 48
CFG = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}}


def _batch(n=12, p=5, t=7, seed=0) -> RolloutBatch:
    return synthetic_batch(VOCAB, n, p, t, seed)


def _loss_fn(batch: RolloutBatch, seed=1):
    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(seed))
    mask = batch.response_mask.float()

    def loss_fn(logp, rows):  # -mean(logp * A) over all masked tokens, split over micro-batches
        loss = -(logp * adv[rows, None] * mask[rows]).sum() / mask.sum()
        return loss, {"adv_mean": float(adv[rows].mean())}

    return loss_fn


def _trainer(name="fp16", policy=None, **kw):
    kw = {"lr": 1e-2, "micro_batch_size": 5, "max_grad_norm": 1.0, **kw}
    return TorchPolicy(CFG, policy or PrecisionPolicy.from_name(name), **kw)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_train_steps_reduce_the_loss(name):
    trainer = _trainer(name)
    assert isinstance(trainer, PolicyEngine)
    batch, loss_fn = _batch(), _loss_fn(_batch())
    results = [trainer.train_step(batch, loss_fn, 1.0) for _ in range(4)]
    losses = [r.metrics["loss"] for r in results]
    assert not any(r.skipped for r in results)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(0 < r.grad_norm < float("inf") for r in results)
    assert results[0].loss_scale == (2.0**16 if name == "fp16" else 1.0)
    assert {p.dtype for p in trainer.compute.parameters()} == {trainer.precision.param_dtype}
    assert {p.dtype for p in trainer.master.parameters()} == {torch.float32}
    assert (trainer.compute is trainer.master) == (name == "fp32")
    assert trainer.audit() == []


def test_logprobs_zero_masked_and_micro_batch_invariant():
    trainer = _trainer("fp32", micro_batch_size=12)
    batch = _batch()
    full = trainer.logprobs(batch, 0.9)
    trainer.micro_batch_size = 1
    assert torch.equal(full == 0, batch.response_mask == 0)
    torch.testing.assert_close(trainer.logprobs(batch, 0.9), full, rtol=0, atol=1e-5)


def test_grad_norm_is_reported_before_clipping():
    a, b = _trainer("fp32", max_grad_norm=0.0), _trainer("fp32", max_grad_norm=1e-4)
    batch, loss_fn = _batch(), _loss_fn(_batch())
    ra, rb = a.train_step(batch, loss_fn, 1.0), b.train_step(batch, loss_fn, 1.0)
    assert rb.grad_norm == pytest.approx(ra.grad_norm, rel=1e-5) and ra.grad_norm > 1e-3
    step_a = sum((p - q).norm() ** 2 for p, q in zip(a.master.parameters(), _trainer("fp32").master.parameters(), strict=True))
    step_b = sum((p - q).norm() ** 2 for p, q in zip(b.master.parameters(), _trainer("fp32").master.parameters(), strict=True))
    assert step_b < step_a  # clipping shrank the first Adam step (|update| ~ lr per element otherwise)


def test_injected_inf_skips_step_and_backs_off_per_hysteresis():
    trainer = _trainer("fp16")  # hysteresis 2, backoff 0.5
    batch, loss_fn = _batch(), _loss_fn(_batch())
    trainer.train_step(batch, loss_fn, 1.0)  # give the optimizer some state
    trainer.logprobs(batch, 1.0)  # refresh the compute copy from the stepped master
    weights = {k: v.clone() for k, v in trainer.master.state_dict().items()}
    compute = {k: v.clone() for k, v in trainer.compute.state_dict().items()}
    opt = copy.deepcopy(trainer.optimizer.state_dict())

    def plant_inf(grads):
        grads[3].view(-1)[0] = float("inf")

    trainer.grad_hook = plant_inf
    scales = []
    for _ in range(2):
        r = trainer.train_step(batch, loss_fn, 1.0)
        assert r.skipped and r.metrics["skipped"] == 1.0 and r.grad_norm != r.grad_norm  # nan
        assert all(torch.equal(v, weights[k]) for k, v in trainer.master.state_dict().items())
        assert all(torch.equal(v, compute[k]) for k, v in trainer.compute.state_dict().items())
        assert _state_equal(trainer.optimizer.state_dict(), opt)
        scales.append(trainer.scaler.scale)
    assert scales == [2.0**16, 2.0**15]  # first overflow absorbed by hysteresis, second halves
    trainer.grad_hook = None
    r = trainer.train_step(batch, loss_fn, 1.0)
    assert not r.skipped and r.loss_scale == 2.0**15
    assert not all(torch.equal(v, weights[k]) for k, v in trainer.master.state_dict().items())


def test_real_fp16_gradient_overflow_is_skipped():
    """A loss scale far too large overflows the fp16 gradients for real (no injection)."""
    fp16 = PrecisionPolicy.from_name("fp16")
    policy = dataclasses.replace(fp16, loss_scale=dataclasses.replace(fp16.loss_scale, initial_scale=2.0**40,
                                                                      hysteresis=1))
    trainer = _trainer(policy=policy)
    before = {k: v.clone() for k, v in trainer.master.state_dict().items()}
    r = trainer.train_step(_batch(), _loss_fn(_batch()), 1.0)
    assert r.skipped and r.loss_scale == 2.0**40 and trainer.scaler.scale == 2.0**39
    assert all(torch.equal(v, before[k]) for k, v in trainer.master.state_dict().items())
    assert trainer.optimizer.state_dict()["state"] == {}


def test_state_dict_round_trip_continues_bitwise():
    batch, loss_fn = _batch(), _loss_fn(_batch())
    a = _trainer("fp16")
    for _ in range(2):
        a.train_step(batch, loss_fn, 1.0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _trainer("fp16", seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(2):
        ra, rb = a.train_step(batch, loss_fn, 1.0), b.train_step(batch, loss_fn, 1.0)
        assert ra.metrics["loss"] == rb.metrics["loss"] and ra.grad_norm == rb.grad_norm
    assert all(torch.equal(v, b.master.state_dict()[k]) for k, v in a.master.state_dict().items())
    assert _state_equal(a.optimizer.state_dict(), b.optimizer.state_dict())
    assert a.scaler.state_dict() == b.scaler.state_dict()
    with pytest.raises(ValueError, match="loss scaling"):
        _trainer("bf16").load_state_dict(a.state_dict())


def test_audit_catches_planted_mismatches():
    trainer = _trainer("fp16")
    assert trainer.audit() == []
    trainer.compute.model.layers[0].self_attn.q_proj.to(torch.bfloat16)
    problems = trainer.audit()
    assert len(problems) == 1 and "layers.0.self_attn.q_proj" in problems[0]
    trainer = _trainer("fp16")
    trainer.master.lm_head.half()
    assert any("master" in p for p in trainer.audit())


def test_activation_headroom_and_loss_fn_metrics():
    trainer = _trainer("fp16")
    batch = _batch()
    m = trainer.activation_headroom(batch)
    assert 0 < m["range/act_absmax"] < 65504 and m["range/act_nonfinite"] == 0
    assert m["range/fp16_headroom"] == pytest.approx(65504 / m["range/act_absmax"])
    assert "range/act_absmax/layer1" in m
    r = trainer.train_step(batch, _loss_fn(batch), 1.0)
    adv = torch.randn(12, generator=torch.Generator().manual_seed(1))
    assert r.metrics["adv_mean"] == pytest.approx(float(adv.mean()), rel=1e-5, abs=1e-6)  # row-weighted


def test_initial_state_dict_is_loaded():
    src = _trainer("fp32", seed=7).rollout_state_dict()
    t = _trainer("bf16", initial_state_dict=src)
    assert all(torch.equal(v, src[k]) for k, v in t.rollout_state_dict().items())
    with pytest.raises(ValueError, match="missing"):
        _trainer("fp32", initial_state_dict={k: v for k, v in src.items() if "norm" not in k})


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _fsdp_worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        trainer = _trainer(name)
        batch = _batch()
        logp0 = trainer.logprobs(batch, 1.0)  # each rank scores its half, then all-gather
        results = [trainer.train_step(batch, _loss_fn(batch), 1.0) for _ in range(2)]
        state = trainer.rollout_state_dict()  # collective: full state dict on rank 0
        full = trainer.state_dict()  # collective: full optimizer state too
        if rank == 0:
            torch.save({"fsdp": trainer._fsdp, "loss": [r.metrics["loss"] for r in results],
                        "grad_norm": [r.grad_norm for r in results], "skipped": [r.skipped for r in results],
                        "micro": [len(r.micro_metrics) for r in results], "adv_mean": results[0].metrics["adv_mean"],
                        "logp0": logp0, "state": state, "optim_keys": sorted(full["optimizer"]["state"])}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_fsdp2_gloo_two_processes_match_single_process(name, tmp_path):
    """FSDP2 `fully_shard` + MixedPrecisionPolicy over gloo on CPU, 2 ranks, each on its half of
    the rows (data parallel, gradients summed): log-probs gather to the single-process values,
    step 1 matches one process to fp32 rounding (the halves are summed in another order); after
    that Adam amplifies that rounding, so only closeness."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_fsdp_worker, args=(2, port, name, out), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    single = _trainer(name)
    batch = _batch()
    assert batch.num_samples % 2 == 0
    ref_logp = single.logprobs(batch, 1.0)
    ref = [single.train_step(batch, _loss_fn(batch), 1.0) for _ in range(2)]
    assert got["fsdp"] and got["skipped"] == [False, False]
    torch.testing.assert_close(got["logp0"], ref_logp, rtol=0, atol=1e-6)
    assert got["micro"] == [4, 4]  # 6 rows per rank in micro-batches of 5 -> 2 per rank, both ranks gathered
    assert got["adv_mean"] == pytest.approx(ref[0].metrics["adv_mean"], rel=1e-6)
    assert got["loss"][0] == pytest.approx(ref[0].metrics["loss"], rel=1e-6)
    assert got["grad_norm"][0] == pytest.approx(ref[0].grad_norm, rel=1e-5)
    assert got["optim_keys"] and all(isinstance(k, str) for k in got["optim_keys"])  # full state, by name
    assert got["loss"][1] == pytest.approx(ref[1].metrics["loss"], rel=1e-3)
    assert set(got["state"]) == set(single.rollout_state_dict())


def test_micro_batch_grads_accumulate_in_grad_reduce_dtype():
    """bf16 compute with bf16 gradient accumulation (a deliberate, unusual policy) still steps;
    with the default fp32 accumulation, micro-batching changes the step only at rounding level."""
    bf16 = PrecisionPolicy.from_name("bf16")
    odd = _trainer(policy=dataclasses.replace(bf16, grad_reduce_dtype=torch.bfloat16))
    r = odd.train_step(_batch(), _loss_fn(_batch()), 1.0)
    assert not r.skipped and r.grad_norm > 0
    one, many = _trainer("fp16", micro_batch_size=12), _trainer("fp16", micro_batch_size=1)
    g1 = one.train_step(_batch(), _loss_fn(_batch()), 1.0).grad_norm
    g12 = many.train_step(_batch(), _loss_fn(_batch()), 1.0).grad_norm
    assert g12 == pytest.approx(g1, rel=2e-3)


# Torch backend memory (issue 20): log-probs chunked along T and layer recompute
# (`policy.activation_checkpointing`), both bitwise equal to the plain computation (values and gradients).
MEMORY_VOCAB = 64
MEMORY_CFG = {"config": {"model_type": "qwen2", "vocab_size": MEMORY_VOCAB, "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "max_position_embeddings": 64, "rope_theta": 5000.0, "tie_word_embeddings": False}}


def _memory_loss(batch):
    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(1))
    mask = batch.response_mask.float()
    return lambda logp, rows: (-(logp * adv[rows, None] * mask[rows]).sum() / mask.sum(), {})


def _memory_run(monkeypatch, chunk_elements=None, **kw):
    if chunk_elements is not None:
        monkeypatch.setattr(logprobs_module, "LOGPROB_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    tr = TorchPolicy(MEMORY_CFG, PrecisionPolicy.from_name("fp16"), lr=1e-2, micro_batch_size=3, seed=2, **kw)
    b = synthetic_batch(MEMORY_VOCAB, 6, 5, 7)
    tr.layer_calls = 0

    def count(*_):
        tr.layer_calls += 1

    tr.compute.model.layers[0].mlp.register_forward_pre_hook(count)  # inside the recomputed region
    lp = tr.logprobs(b, 0.8)
    res = [tr.train_step(b, _memory_loss(b), 0.8) for _ in range(2)]
    return tr, lp, [r.grad_norm for r in res], {k: v.clone() for k, v in tr.master.state_dict().items()}


def test_torch_policy_chunked_logprobs_bitwise(monkeypatch):
    _, lp0, gn0, w0 = _memory_run(monkeypatch)
    _, lp1, gn1, w1 = _memory_run(monkeypatch, chunk_elements=3 * 2 * MEMORY_VOCAB)  # 2 positions per chunk of a 3-row micro-batch
    assert torch.equal(lp0, lp1) and gn0 == gn1 and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_activation_checkpointing_recomputes_layers_bitwise(monkeypatch):
    plain, lp0, gn0, w0 = _memory_run(monkeypatch)
    tr, lp1, gn1, w1 = _memory_run(monkeypatch, activation_checkpointing=True)
    # 2 micro-batches: scoring runs each layer once, each training step twice with recompute
    assert (plain.layer_calls, tr.layer_calls) == (2 + 2 * 2, 2 + 2 * 2 * 2)
    layers = [m for m in tr.compute.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len([m for m in layers if type(m).__name__.endswith("DecoderLayer")]) == 2
    assert not any(m.training for m in tr.compute.modules() if type(m).__name__.endswith("Attention"))
    assert torch.equal(lp0, lp1) and gn0 == gn1 and all(torch.equal(w0[k], w1[k]) for k in w0)
