"""Micro-batches trimmed to their own length.

Megatron backend (on by default): log-probs, losses, grad norms and weights after two steps bitwise
equal to scoring every micro-batch at the global padded width (CPU, fp16). Torch backend (off by
default, so its numbers do not move): fp16 log-probs are bitwise too, but the weight gradients
reduce over fewer tokens in another order (~1e-6 after two steps), so training is not."""

from __future__ import annotations

import torch

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.policy.trim import trim
from nemo_rl_fp16.precision import PrecisionPolicy

VOCAB = 64
DENSE = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 64, "rope_theta": 5000.0, "tie_word_embeddings": False}}


def _ragged(n=8, p=6, t=9, seed=0) -> RolloutBatch:
    """Rows sorted by length so whole micro-batches are shorter than the batch: prompts left-padded, responses ended."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, p + t), generator=g)
    attn = torch.ones_like(ids)
    resp = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        attn[i, : (n - 1 - i) * p // n] = 0  # later rows have longer prompts
        resp[i, : 1 + i * (t - 1) // (n - 1)] = 1  # and longer responses
    attn[:, p:] = resp
    ids[:, p:][resp == 0] = 0
    return RolloutBatch(input_ids=ids, attention_mask=attn, response_mask=resp, rollout_logp=torch.zeros(n, t),
                        prompt_width=p, prompt_index=torch.arange(n) // 2)


def _loss(batch):
    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(1))
    mask = batch.response_mask.float()
    return lambda logp, rows: (-(logp * adv[rows, None] * mask[rows]).sum() / mask.sum(), {"lp": logp.sum()})


def _steps(make, trimmed: bool):
    tr = make()
    tr.loop.trim = trimmed
    b = _ragged()
    lp = tr.logprobs(b, 0.8)
    res = [tr.train_step(b, _loss(b), 0.8) for _ in range(2)]
    return lp, [(r.grad_norm, r.metrics["loss"]) for r in res], tr.rollout_state_dict()


def _same(a, b):
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_trim_drops_only_all_padding_columns():
    b = _ragged()
    mb = trim(b.select(slice(0, 3)))
    assert (mb.prompt_width, mb.response_mask.shape[1]) < (b.prompt_width, 9)
    assert mb.attention_mask.sum() == b.attention_mask[:3].sum()  # no real token lost
    assert trim(b) is b  # the whole batch has no all-padding column


def test_torch_backend_trim_is_off_and_its_fp16_logprobs_bitwise():
    def make():
        return TorchPolicy(DENSE, PrecisionPolicy.from_name("fp16"), lr=1e-2, micro_batch_size=3, seed=2)

    assert make().loop.trim is False  # the torch backend's training numbers stay as they were
    on, off = _steps(make, True), _steps(make, False)
    assert torch.equal(on[0], off[0]) and on[1][0] == off[1][0]  # log-probs, and the first step's metrics


def test_megatron_backend_trimmed_is_bitwise(mcore_cpu):
    from conftest import reset_megatron

    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

    def make():
        reset_megatron()
        return MegatronPolicy(DENSE, PrecisionPolicy.from_name("fp16"), lr=1e-2, micro_batch_size=3, seed=2)

    assert make().loop.trim is True
    _same(_steps(make, True), _steps(make, False))
