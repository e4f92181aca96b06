"""`MasterWeights` on the toy model of test_micro_batches.py: fp16 compute copy, fp32 accumulation,
unscale, overflow skip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import synthetic_batch
from test_micro_batches import VOCAB, N, P, T, Toy, ToyAdapter, _loss_fn

from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop
from nemo_rl_fp16.policy.mixed_precision import MasterWeights
from nemo_rl_fp16.precision import PrecisionPolicy


def test_master_weights_fp16_step_and_overflow_skip():
    batch = synthetic_batch(VOCAB, N, P, T)
    pol = PrecisionPolicy.from_name("fp16")
    master = Toy()
    ref = copy.deepcopy(master)
    compute = copy.deepcopy(master).half()
    w = MasterWeights(master, compute, torch.optim.SGD(master.parameters(), lr=0.1), pol, max_grad_norm=0.0)
    loop = MicroBatchLoop(ToyAdapter(compute), micro_batch_size=5)
    # a planted inf: weights, compute copy and scale back-off as the loss scaler says
    before = [p.clone() for p in master.parameters()]
    r = w.train_step(loop, batch, _loss_fn(batch), 1.0, grad_hook=lambda g: g[0].view(-1)[0].fill_(float("inf")))
    assert r.skipped and r.grad_norm != r.grad_norm and r.loss_scale == pol.loss_scale.initial_scale
    assert all(torch.equal(a, b) for a, b in zip(before, master.parameters(), strict=True))
    assert w.back_off_loss_scale(r.loss_scale) and w.scaler.scale < r.loss_scale
    # a clean step: fp32 master grads = fp16 grads accumulated in fp32, unscaled; SGD moves the master
    scale = w.scaler.scale
    r = w.train_step(loop, batch, _loss_fn(batch), 1.0)
    assert not r.skipped and r.loss_scale == scale
    loss, _ = _loss_fn(batch)(ref(batch.input_ids), slice(0, N))
    loss.backward()
    ref_norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
    assert r.grad_norm == pytest.approx(ref_norm, rel=2e-2)  # fp16 compute vs fp32 reference
    assert not all(torch.equal(a, b) for a, b in zip(before, master.parameters(), strict=True))
    w.sync_compute()
    assert all(torch.equal(c, m.half()) for c, m in zip(compute.parameters(), master.parameters(), strict=True))
    assert w.audit() == []
