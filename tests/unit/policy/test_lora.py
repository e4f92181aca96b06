"""LoRA on the torch trainer (peft): only adapters train, in the policy precision; the rollout
engine is refit with merged fp32 weights (W + scale*B@A) under the base HF names."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.interfaces import RolloutBatch, SamplingParams
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.rollout import TorchRolloutEngine

pytest.importorskip("peft")

RC = typed(load_recipe("sanity_tiny", ["policy.lora.enabled=true", "policy.lora.rank=4", "policy.lr=1e-2"]))
MODEL = RC.model.model_dump()
LORA = RC.policy.lora.model_dump()
VOCAB = MODEL["config"]["vocab_size"]


def _batch(n=8, p=4, t=5, seed=0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, p + t), generator=g)
    attn, resp = torch.ones_like(ids), torch.ones(n, t, dtype=torch.long)
    resp[1::2, -2:] = 0
    attn[:, p:] = resp
    return RolloutBatch(input_ids=ids, attention_mask=attn, response_mask=resp, rollout_logp=torch.zeros(n, t),
                        prompt_width=p, prompt_index=torch.arange(n) // 2)


def _loss_fn(batch: RolloutBatch):
    adv = torch.randn(batch.num_samples, generator=torch.Generator().manual_seed(1))
    mask = batch.response_mask.float()
    return lambda logp, rows: (-(logp * adv[rows, None] * mask[rows]).sum() / mask.sum(), {})


def _trainer(name: str, lora=LORA) -> TorchPolicy:
    return TorchPolicy(MODEL, PrecisionPolicy.from_name(name), lr=RC.policy.lr, micro_batch_size=4,
                              seed=RC.seed, lora=lora)


def test_lora_recipe_composes():
    rc = typed(load_recipe("lora_fp16"))
    assert rc.policy.lora.enabled and rc.policy.lora.rank == 1 and rc.precision.name == "fp16"


@pytest.mark.parametrize("name", ["fp16", "fp32"])
def test_only_adapters_train_and_refit_is_merged(name):
    trainer = _trainer(name)
    base = _trainer(name, lora=None).rollout_state_dict()
    before = {k: v.clone() for k, v in trainer.master.named_parameters()}
    assert {p for g in trainer.optimizer.param_groups for p in g["params"]} == {
        p for n, p in trainer.master.named_parameters() if "lora_" in n}
    batch = _batch()
    for _ in range(3):
        r = trainer.train_step(batch, _loss_fn(batch), 1.0)
        assert not r.skipped
    changed = {k for k, v in trainer.master.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: the delta is now non-zero
    assert {p.dtype for n, p in trainer.compute.named_parameters() if "lora_" in n} == {trainer.precision.param_dtype}
    assert trainer.audit() == []

    merged = trainer.rollout_state_dict()
    assert merged.keys() == base.keys()  # the base model's HF names, no lora_/base_layer keys
    assert all(v.dtype == torch.float32 for v in merged.values())
    scale = LORA["alpha"] / LORA["rank"]
    inner = trainer.master.get_base_model()
    for layer_name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        mod = inner.get_submodule(layer_name)
        delta = scale * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
        torch.testing.assert_close(merged[f"{layer_name}.weight"], base[f"{layer_name}.weight"] + delta)
        assert not torch.equal(merged[f"{layer_name}.weight"], base[f"{layer_name}.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_fp32_rollout_matches_fp32_trainer_after_refit():
    trainer = _trainer("fp32")
    batch = _batch()
    for _ in range(2):
        trainer.train_step(batch, _loss_fn(batch), 1.0)
    engine = TorchRolloutEngine(MODEL, PrecisionPolicy.from_name("fp32"), pad_token_id=0, eos_token_id=1,
                                seed=RC.seed)
    engine.update_weights(trainer.rollout_state_dict())
    prompts = [[3, 4, 5], [6, 7, 8, 9], [10, 11]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=1.0, num_generations=2, seed=3))
    logp = trainer.logprobs(out, 1.0)
    mask = out.response_mask.bool()
    torch.testing.assert_close(logp[mask], out.rollout_logp[mask], atol=1e-5, rtol=0)


def test_lora_checkpoint_round_trip():
    a, b = _trainer("fp16"), _trainer("fp16")
    batch = _batch()
    a.train_step(batch, _loss_fn(batch), 1.0)
    b.load_state_dict(a.state_dict())
    for k, v in a.rollout_state_dict().items():
        assert torch.equal(v, b.rollout_state_dict()[k]), k


def test_recipe_lora_block_reaches_the_trainer(tmp_path):
    """`policy.lora.enabled=true` on the command line builds a LoRA trainer (not a full fine-tune)."""
    from rich.console import Console

    from nemo_rl_fp16.assembly import build_run
    from nemo_rl_fp16.config import load_recipe, typed

    rc = typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}/o", f"warm_start.cache_dir={tmp_path}/ws",
                                           "policy.lora.enabled=true", "policy.lora.rank=2"]))
    policy = build_run(rc, console=Console(quiet=True)).policy
    trainable = [n for n, p in policy.master.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
