"""Megatron fp16/bf16 RL updates through megatron's own optimizer (Float16Module + DDP +
`get_megatron_optimizer`, dynamic loss scaling) on one GPU. Run by scripts/gpu_check.sh.

Prints one `GPU-RESULT` line per case (loss per step, loss scale, skips, grad norm) for the note.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("megatron.core")

from nemo_rl_fp16.algorithms import policy_loss  # noqa: E402
from nemo_rl_fp16.interfaces import RolloutBatch  # noqa: E402
from nemo_rl_fp16.policy import TorchPolicy  # noqa: E402
from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy  # noqa: E402
from nemo_rl_fp16.precision import PrecisionPolicy  # noqa: E402

VOCAB = 512
DENSE = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512,
                    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                    "max_position_embeddings": 256, "rope_theta": 1e6, "tie_word_embeddings": False}}
MOE = {"config": {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512,
                  "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
                  "num_key_value_heads": 2, "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                  "norm_topk_prob": True, "max_position_embeddings": 256, "tie_word_embeddings": False}}


def _batch(n=16, p=16, t=48, seed=0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, p + t), generator=g)
    attn = torch.ones_like(ids)
    attn[::3, :4] = 0
    resp = torch.ones(n, t, dtype=torch.long)
    resp[1::2, -10:] = 0
    attn[:, p:] = resp
    return RolloutBatch(input_ids=ids, attention_mask=attn, response_mask=resp, rollout_logp=torch.zeros(n, t),
                        prompt_width=p, prompt_index=torch.arange(n) // 4)


def _grpo_step(tr, b, adv):
    old = tr.logprobs(b, 1.0).cpu()
    mask = b.response_mask.float()

    def loss_fn(logp, rows):
        loss, _ = policy_loss("grpo", logp.cpu(), old[rows], old[rows], adv[rows], mask[rows])
        return loss * (rows.stop - rows.start) / b.num_samples, {}

    return tr.train_step(b, loss_fn, 1.0)


def _policy(name, router_fp32=False):
    pol = PrecisionPolicy.from_name(name)
    return dataclasses.replace(pol, router_dtype=torch.float32) if router_fp32 else pol


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_rl_update_through_megatron_optimizer(name, model):
    cfg = DENSE if model == "dense" else MOE
    pol = _policy(name, router_fp32=model == "moe")
    tr = MegatronPolicy(cfg, pol, lr=1e-3, micro_batch_size=8, device="cuda", seed=0)
    assert tr.mcore_optimizer is not None and tr.audit() == [], tr.audit()
    b = _batch()
    adv = torch.randn(b.num_samples, generator=torch.Generator().manual_seed(1))
    # a fixed surrogate: the GRPO loss at ratio 1 is -mean(A); track -mean(logp * A) instead
    mask = b.response_mask.float()
    res = []
    for _ in range(6):
        r = _grpo_step(tr, b, adv)
        res.append(r)
    lp = tr.logprobs(b, 1.0).cpu()
    obj_after = float(-(lp * adv[:, None] * mask).sum() / mask.sum())
    tr0 = MegatronPolicy(cfg, pol, lr=1e-3, micro_batch_size=8, device="cuda", seed=0)
    lp0 = tr0.logprobs(b, 1.0).cpu()
    obj_before = float(-(lp0 * adv[:, None] * mask).sum() / mask.sum())
    print(f"GPU-RESULT megatron {model} {name}: loss_scale {[r.loss_scale for r in res]} skipped "
          f"{[r.skipped for r in res]} grad_norm {[round(r.grad_norm, 4) for r in res]} "
          f"-E[A logp] {obj_before:.4f} -> {obj_after:.4f}", flush=True)
    assert not all(r.skipped for r in res)
    assert obj_after < obj_before - 1e-3
    if name == "fp16":
        assert res[0].loss_scale == pol.loss_scale.initial_scale
    else:
        assert all(r.loss_scale == 1.0 for r in res)
    sd = tr.rollout_state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_fp16_overflow_is_skipped_by_megatron_scaler():
    tr = MegatronPolicy(DENSE, _policy("fp16"), lr=1e-3, micro_batch_size=8, device="cuda", seed=0)
    b = _batch()
    adv = torch.randn(b.num_samples, generator=torch.Generator().manual_seed(1))
    tr.grad_hook = lambda grads: grads[0].view(-1)[0].fill_(float("inf"))
    before = tr.rollout_state_dict()
    scales = []
    for _ in range(3):
        r = _grpo_step(tr, b, adv)
        assert r.skipped
        scales.append(r.loss_scale)
    after = tr.rollout_state_dict()
    print(f"GPU-RESULT megatron fp16 planted overflow: scales {scales} (hysteresis 2)", flush=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert scales[-1] < scales[0]


def test_fp32_megatron_logprobs_equal_torch_backend_on_gpu():
    sd = TorchPolicy(DENSE, _policy("fp32"), lr=1e-3, device="cuda", seed=0).rollout_state_dict()
    b = _batch()
    mt = MegatronPolicy(DENSE, _policy("fp32"), lr=1e-3, device="cuda", seed=0, initial_state_dict=sd)
    tt = TorchPolicy(DENSE, _policy("fp32"), lr=1e-3, device="cuda", seed=0, initial_state_dict=sd)
    err = (mt.logprobs(b, 1.0) - tt.logprobs(b, 1.0)).abs().max().item()
    print(f"GPU-RESULT fp32 megatron vs torch log-prob max|diff| {err:.2e}", flush=True)
    assert err < 1e-3  # TF32 / kernel differences on GPU
