"""MegatronPolicy on CPU (one process): logits == HF, log-probs == the torch backend,
train steps (CPU fallback optimizer), MoE routing, audit. TP=2/EP=2: test_megatron_parallel.py;
attention choice and SDPA: test_attention.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import synthetic_batch

from nemo_rl_fp16.interfaces import PolicyEngine, RolloutBatch
from nemo_rl_fp16.modeling import build_model, position_ids_from_mask
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy

pytest.importorskip("megatron.core")

from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy  # noqa: E402

VOCAB = 64
DENSE = {"config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 64, "rope_theta": 5000.0, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": False}}
MOE = {"config": {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "norm_topk_prob": True, "max_position_embeddings": 64, "rope_theta": 20000.0,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False}}


def _weights(cfg, seed=0):
    """fp32 HF weights with non-trivial norms and biases (the default init has them all 1 / 0)."""
    hf = build_model(cfg, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return hf, {k: v.detach().clone() for k, v in hf.state_dict().items()}


def _batch(n=6, p=5, t=6, seed=0) -> RolloutBatch:
    return synthetic_batch(VOCAB, n, p, t, seed)


def _loss_fn(batch, seed=1):
    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(seed))
    mask = batch.response_mask.float()

    def loss_fn(logp, rows):
        return -(logp * adv[rows, None] * mask[rows]).sum() / mask.sum(), {}

    return loss_fn


def _mtrainer(cfg, name="fp32", init=None, **kw):
    kw = {"lr": 1e-2, "micro_batch_size": 4, "max_grad_norm": 1.0, **kw}
    return MegatronPolicy(cfg, PrecisionPolicy.from_name(name), initial_state_dict=init, **kw)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["qwen2", "qwen3_moe"])
def test_megatron_logits_equal_hf_fp32(mcore_cpu, cfg):
    hf, sd = _weights(cfg)
    tr = _mtrainer(cfg, init=sd)
    b = _batch()
    pos = position_ids_from_mask(b.attention_mask)
    with torch.no_grad():
        ref = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos).logits
        out = tr.master(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=2e-5)
    # the refit state dict is the HF one, bitwise
    back = tr.rollout_state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert tr.audit() == []


def test_megatron_logprobs_equal_torch_backend(mcore_cpu):
    _, sd = _weights(DENSE)
    b = _batch()
    mt = _mtrainer(DENSE, init=sd)
    assert isinstance(mt, PolicyEngine)
    tt = TorchPolicy(DENSE, PrecisionPolicy.from_name("fp32"), lr=1e-2, initial_state_dict=sd)
    for temp in (1.0, 0.7):
        a, c = mt.logprobs(b, temp), tt.logprobs(b, temp)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
        assert torch.equal(a == 0, b.response_mask == 0)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["qwen2", "qwen3_moe"])
def test_local_checkpoint_streams_one_tensor_at_a_time(mcore_cpu, cfg, tmp_path, monkeypatch):
    """A safetensors folder is read lazily (each tensor once, converted and sharded layer by layer)
    and gives exactly the trainer built from the same weights in memory."""
    from nemo_rl_fp16.policy.megatron import convert as megatron_convert

    hf, sd = _weights(cfg)
    hf.save_pretrained(tmp_path / "ckpt")
    reads: list[str] = []
    orig = megatron_convert.LazyHFCheckpoint.__getitem__

    def counted(self, key):
        t = orig(self, key)
        reads.append(key)
        return t

    monkeypatch.setattr(megatron_convert.LazyHFCheckpoint, "__getitem__", counted)
    lazy = MegatronPolicy({"name_or_path": str(tmp_path / "ckpt")}, PrecisionPolicy.from_name("fp32"), lr=1e-2,
                                 micro_batch_size=4)
    assert len(reads) == len(set(reads))  # streamed: every tensor read once ...
    assert set(reads) == set(megatron_convert.LazyHFCheckpoint(tmp_path / "ckpt"))  # ... and all of them
    eager = _mtrainer(cfg, init=sd)
    b = _batch()
    assert torch.equal(lazy.logprobs(b, 1.0), eager.logprobs(b, 1.0))
    back, ref = lazy.rollout_state_dict(), eager.rollout_state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


def test_vocab_parallel_logprobs_equal_full_logit_log_softmax(mcore_cpu):
    """The trainer scores through megatron's vocab-parallel cross entropy (no gathered logits): the
    same values and gradients as fp32 log_softmax over the gathered logits."""
    from nemo_rl_fp16.modeling import response_logprobs

    _, sd = _weights(DENSE)
    b = _batch()
    tr = _mtrainer(DENSE, init=sd)
    ids, attn = b.input_ids, b.attention_mask
    vp = tr.master.response_logprobs(ids, attn, b.prompt_width, 0.7)
    (vp * b.response_mask).sum().backward()
    g_vp = [p.grad.clone() for p in tr.master.parameters()]
    tr.master.zero_grad(set_to_none=True)
    full = response_logprobs(tr.master, ids, attn, b.prompt_width, 0.7)
    (full * b.response_mask).sum().backward()
    torch.testing.assert_close(vp, full, rtol=0, atol=2e-6)
    for a, c in zip(g_vp, (p.grad for p in tr.master.parameters()), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_fused_elementwise_matches_unfused(mcore_cpu):
    """megatron's torch.compile'd SwiGLU path (the GPU benchmark's `+fused`) computes the same model."""
    _, sd = _weights(DENSE)
    b = _batch()
    ref = _mtrainer(DENSE, init=sd).logprobs(b, 1.0)
    fused = _mtrainer(DENSE, init=sd, fused_elementwise=True)
    assert fused.tconfig.bias_activation_fusion
    torch.testing.assert_close(fused.logprobs(b, 1.0), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_train_steps_reduce_the_loss_cpu_fallback(mcore_cpu, name):
    _, sd = _weights(DENSE)
    tr = _mtrainer(DENSE, name, init=sd)
    b = _batch()
    loss_fn = _loss_fn(b)
    res = [tr.train_step(b, loss_fn, 1.0) for _ in range(4)]
    losses = [r.metrics["loss"] for r in res]
    assert not any(r.skipped for r in res)
    assert losses[-1] < losses[0] - 0.05, losses
    assert res[0].loss_scale == (2.0**16 if name == "fp16" else 1.0)
    assert {p.dtype for p in tr.compute.parameters()} == {tr.precision.param_dtype}
    assert {p.dtype for p in tr.master.parameters()} == {torch.float32}
    assert tr.audit() == []
    head = tr.activation_headroom(b)  # the fp16 range monitor walks megatron's decoder layers
    assert set(head) >= {"range/act_absmax/layer0", "range/act_absmax/layer1", "range/fp16_headroom"}
    # fp32 master weights moved and come back under HF names
    new = tr.rollout_state_dict()
    assert set(new) == set(sd) and not torch.equal(new["model.layers.0.mlp.up_proj.weight"],
                                                   sd["model.layers.0.mlp.up_proj.weight"])


def test_checkpoint_round_trip_cpu(mcore_cpu):
    _, sd = _weights(DENSE)
    a, b = _mtrainer(DENSE, "fp16", init=sd), _mtrainer(DENSE, "fp16", init=sd)
    batch = _batch()
    a.train_step(batch, _loss_fn(batch), 1.0)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # state_dict() holds live references
    ra, rb = a.train_step(batch, _loss_fn(batch), 1.0), b.train_step(batch, _loss_fn(batch), 1.0)
    assert ra.metrics["loss"] == rb.metrics["loss"] and ra.loss_scale == rb.loss_scale
    sa, sb = a.rollout_state_dict(), b.rollout_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fp16_overflow_skips_the_step(mcore_cpu):
    _, sd = _weights(DENSE)
    tr = _mtrainer(DENSE, "fp16", init=sd)
    tr.grad_hook = lambda grads: grads[0].view(-1)[0].fill_(float("inf"))
    b = _batch()
    before = tr.rollout_state_dict()
    r = tr.train_step(b, _loss_fn(b), 1.0)
    assert r.skipped
    after = tr.rollout_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_moe_experts_and_router_dtype(mcore_cpu):
    hf, sd = _weights(MOE)
    b = _batch()
    pol = dataclasses.replace(PrecisionPolicy.from_name("fp16"), router_dtype=torch.float32)
    tr = MegatronPolicy(MOE, pol, lr=1e-3, initial_state_dict=sd)
    assert tr.tconfig.moe_router_dtype == "fp32" and not tr.tconfig.moe_grouped_gemm
    routers = {n: p.dtype for n, p in tr.compute.named_parameters() if ".router." in n}
    assert routers and set(routers.values()) == {torch.float32}
    assert tr.audit() == []
    # a router left in fp16 is reported
    next(p for n, p in tr.compute.named_parameters() if ".router." in n).data = torch.zeros(4, 64, dtype=torch.float16)
    assert any("router" in line for line in tr.audit())
    # fp32 trainer: selected experts == HF's top-k on the same tokens (position P + t - 1 scores token t)
    t32 = _mtrainer(MOE, init=sd)
    ex = t32.selected_experts(b)
    assert ex.shape == (6, 6, 2, 2)
    caught = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, j=j: caught.__setitem__(j, o))
             for j, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(input_ids=b.input_ids, attention_mask=b.attention_mask,
           position_ids=position_ids_from_mask(b.attention_mask))
    for h in hooks:
        h.remove()
    p = b.prompt_width
    for j in range(2):
        idx = caught[j][2] if isinstance(caught[j], tuple) and len(caught[j]) == 3 else caught[j][-1]
        idx = idx.reshape(6, p + 6, 2).sort(-1).values[:, p - 1:-1]
        real = b.response_mask.bool()
        assert torch.equal(ex[:, :, j][real], idx[real])
    # fp16 MoE (non-grouped experts) trains on the CPU fallback
    r = [tr.train_step(b, _loss_fn(b), 1.0) for _ in range(2)]
    assert not r[0].skipped and r[1].metrics["loss"] < r[0].metrics["loss"]


def test_cuda_resume_is_refused_in_one_line():
    """Without the CPU master step (the CUDA path) the megatron backend cannot restore its sharded
    fp32 main params / optimizer / grad scaler: one line naming what is missing, before any copy."""
    from types import SimpleNamespace

    with pytest.raises(NotImplementedError, match="needs megatron dist-checkpointing") as e:
        MegatronPolicy.load_state_dict(SimpleNamespace(weights=None), {"model": {}, "optimizer": {}, "scaler": None})
    assert "\n" not in str(e.value) and "fp32 main params" in str(e.value)


def test_distributed_optimizer_refused_on_cpu_and_resolved_on_cuda(mcore_cpu):
    """`policy.use_distributed_optimizer`: megatron's distributed optimizer is CUDA-only (refused in one line
    on CPU, never silently dropped); null resolves to on with CUDA, off on CPU (the build and the plan share it)."""
    from nemo_rl_fp16.policy.factory import distributed_optimizer

    with pytest.raises(ValueError, match="'policy.use_distributed_optimizer': true on CPU") as e:
        _mtrainer(DENSE, use_distributed_optimizer=True)
    assert "\n" not in str(e.value)
    assert _mtrainer(DENSE, use_distributed_optimizer=False).use_distributed_optimizer is False
    assert [distributed_optimizer(v, d) for v in (None, True, False) for d in ("cuda", "cpu")] == \
        [True, False, True, True, False, False]
