"""The loop's loss (`PolicyLossFn`) through a real TorchPolicy (fp32): the step's loss and the fp32
master gradients do not depend on `policy.micro_batch_size`, with the KL-to-reference term on."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.algorithms import LossInputs, PolicyLossFn, combine_metrics
from nemo_rl_fp16.config import AlgorithmSection
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy

VOCAB = 48
CFG = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}}
N = 8


def _step(algo: AlgorithmSection, micro_batch_size: int):
    """(loss, combined loss metrics, fp32 master grads) of one step on a fixed batch."""
    trainer = TorchPolicy(CFG, PrecisionPolicy.from_name("fp32"), lr=1e-3, max_grad_norm=0.0,
                                 micro_batch_size=micro_batch_size, seed=3)
    batch = synthetic_batch(VOCAB, N, 4, 9, seed=1)
    batch.response_mask[2, 3:] = 0  # uneven lengths: 9, 6, 3, 6, ...
    batch.response_mask[5, 1:] = 0
    batch.attention_mask[:, 4:] = batch.response_mask
    g = torch.Generator().manual_seed(0)
    logp = trainer.logprobs(batch, 1.0)
    old = torch.where(batch.response_mask.bool(), logp + 0.3 * torch.randn(logp.shape, generator=g), 0.0)
    batch.rollout_logp = torch.where(batch.response_mask.bool(), old + 0.2 * torch.randn(logp.shape, generator=g), 0.0)
    ref = torch.where(batch.response_mask.bool(), logp + 0.5 * torch.randn(logp.shape, generator=g), 0.0)
    adv = torch.randn(N, generator=g)
    grads = []
    trainer.grad_hook = lambda gs: grads.append(torch.cat([x.flatten() for x in gs]).clone())
    loss_fn = PolicyLossFn.from_config(algo, with_reference=True).bind(
        LossInputs(old, batch.rollout_logp, adv, batch.response_mask, ref))
    result = trainer.train_step(batch, loss_fn, 1.0)
    return result.metrics["loss"], combine_metrics(result.micro_metrics), grads[0]


@pytest.mark.parametrize("algo", [
    {"name": "gspo"},
    {"name": "pg_seq_is", "correction": "mis"},
    {"name": "grpo", "correction": "tis", "reduction": "seq_mean_token_mean"},
    {"name": "grpo", "reduction": "seq_mean_token_sum"},
])
def test_step_is_independent_of_micro_batch_size(algo):
    a = AlgorithmSection(**algo, kl_coef=0.05, kl_kind="k3")
    loss, metrics, grad = _step(a, N)
    assert "kl_to_ref" in metrics and grad.norm() > 0
    for mbs in (1, 2, 3, 4):
        loss_m, metrics_m, grad_m = _step(a, mbs)
        # the fault: gspo with kl_coef > 0 gave loss 0.0826 at micro-batch 4 vs 0.0581 at 1
        assert loss_m == pytest.approx(loss, rel=1e-6, abs=1e-7), mbs
        assert float((grad_m - grad).norm() / grad.norm()) <= 1e-6, mbs
        for k, v in metrics.items():
            assert metrics_m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (mbs, k)
