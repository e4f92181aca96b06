"""The shared step core on a toy model: `MicroBatchLoop` (row split, micro-batches, metric weights)
through an adapter that is neither backend; and both backends composing it (no inheritance between
them). `MasterWeights` on the same toy: test_mixed_precision.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.interfaces import PolicyEngine
from nemo_rl_fp16.policy.micro_batches import DataParallel, MicroBatchLoop, ModelAdapter
from nemo_rl_fp16.policy.mixed_precision import MasterWeights
from nemo_rl_fp16.precision import PrecisionPolicy

VOCAB, N, P, T = 16, 12, 3, 4


class Toy(torch.nn.Module):
    """log π(token) = log_softmax(embedding(previous token) @ W) — enough to have gradients."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, 8, generator=g))
        self.out = torch.nn.Parameter(torch.randn(8, VOCAB, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = (self.emb[ids[:, P - 1:-1]] @ self.out).float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None])[..., 0]


class ToyAdapter:
    def __init__(self, model, dp=None):
        self.model, self.dp, self.device, self.scored = model, dp or DataParallel(), torch.device("cpu"), []

    def score(self, mb, temperature):
        self.scored.append(mb.num_samples)
        return self.model(mb.input_ids)

    def numerics(self):
        return contextlib.nullcontext()

    def data_parallel(self):
        return self.dp


def _loss_fn(batch):
    mask = batch.response_mask.float()
    adv = torch.linspace(-1, 1, batch.num_samples)

    def loss_fn(logp, rows):
        return -(logp * adv[rows, None] * mask[rows]).sum() / mask.sum(), {"rows": float(rows.stop - rows.start)}

    return loss_fn


def test_rank_slices_and_uneven_split():
    loop = MicroBatchLoop(ToyAdapter(Toy(), DataParallel(1, 2)), micro_batch_size=4)
    assert list(loop.slices(N)) == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert list(loop.slices(N, local=True)) == [slice(6, 10), slice(10, 12)]
    with pytest.raises(ValueError, match="does not split evenly over 2 data-parallel ranks"):
        list(loop.slices(7, local=True))
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        MicroBatchLoop(ToyAdapter(Toy()), 0)


def test_forward_backward_weights_metrics_by_rows_and_sums_the_loss():
    batch = synthetic_batch(VOCAB, N, P, T)
    adapter = ToyAdapter(Toy())
    assert isinstance(adapter, ModelAdapter)
    loop = MicroBatchLoop(adapter, micro_batch_size=5)
    losses = []
    loss, metrics, micro = loop.forward_backward(batch, _loss_fn(batch), 1.0, losses.append)
    assert adapter.scored == [5, 5, 2]
    assert [m["rows"] for m in micro] == [5.0, 5.0, 2.0]
    assert metrics["rows"] == pytest.approx((25 + 25 + 4) / N)  # each micro-batch weighted by its row share
    full, _ = _loss_fn(batch)(Toy()(batch.input_ids), slice(0, N))
    assert loss == pytest.approx(float(full.detach()), rel=1e-6) and len(losses) == 3
    lp = loop.logprobs(batch, 1.0)
    assert torch.equal(lp == 0, batch.response_mask == 0)


def test_backends_compose_the_core_and_do_not_inherit():
    from nemo_rl_fp16.policy import TorchPolicy
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

    assert not issubclass(MegatronPolicy, TorchPolicy) and not issubclass(TorchPolicy, MegatronPolicy)
    tp = TorchPolicy({"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}},
                     PrecisionPolicy.from_name("fp16"), lr=1e-3)
    assert isinstance(tp, PolicyEngine) and isinstance(tp.adapter, ModelAdapter)
    assert isinstance(tp.loop, MicroBatchLoop) and isinstance(tp.weights, MasterWeights)
    assert tp.master is tp.weights.master and tp.scaler is tp.weights.scaler
