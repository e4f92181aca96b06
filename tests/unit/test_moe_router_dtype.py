"""`precision.router_dtype=float32` on the torch engines: fp32 gate weights, gate logits, softmax and top-k in
the trainer and the torch rollout engine, audited while they run; validation accepts it there and on megatron,
refuses it for the vLLM engine and for other dtypes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from modeling.test_moe_routing import EOS, MIXTRAL, PROMPTS, QWEN2, QWEN3

from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.modeling.moe_routing import hf_routers
from nemo_rl_fp16.plan import check_run
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionMismatchError, PrecisionPolicy, is_router_param, precision_problems
from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine

BF16_FP32_ROUTER = dataclasses.replace(PrecisionPolicy.from_name("bf16"), router_dtype=torch.float32)


def _pair(config, pol=BF16_FP32_ROUTER):
    trainer = TorchPolicy({"config": config}, pol, lr=1e-2, seed=0)
    engine = TorchRolloutEngine({"config": config}, pol, pad_token_id=0, eos_token_id=EOS, seed=0,
                                initial_state_dict=trainer.rollout_state_dict())
    return engine, trainer


def _gate_io(model):
    """Hooks recording each gate's input as the model hands it over (before the package's cast) and its output
    (top-k routers: the logits)."""
    seen, handles = [], []
    gates = [m for n, m in model.named_modules() if is_router_param(f"{n}.weight") and hasattr(m, "weight")]
    for g in gates:
        handles.append(g.register_forward_pre_hook(lambda m, i: seen.append([m, i[0]]), prepend=True))
        handles.append(g.register_forward_hook(lambda m, i, o: seen[-1].append(o[0] if isinstance(o, tuple) else o)))
    return seen, handles


@pytest.mark.parametrize("config", [QWEN3, QWEN2, MIXTRAL], ids=["qwen3_moe", "qwen2_moe", "mixtral"])
def test_fp32_router_on_both_torch_engines(config):
    engine, trainer = _pair(config)
    master = dict(trainer.master.named_parameters())
    for name, model in (("trainer", trainer.compute), ("rollout", engine.model)):
        params = dict(model.named_parameters())
        routers = {n for n in params if is_router_param(n)}
        assert routers, name
        for n, p in params.items():  # gates fp32 and equal to the fp32 master (never rounded through bf16)
            assert p.dtype == (torch.float32 if n in routers else torch.bfloat16), (name, n, p.dtype)
            if n in routers:
                assert torch.equal(p, master[n]), (name, n)
    t_seen, t_handles = _gate_io(trainer.compute)
    e_seen, e_handles = _gate_io(engine.model)
    batch = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, num_generations=2, seed=1))
    trainer.logprobs(batch, 1.0)
    for h in t_handles + e_handles:
        h.remove()
    topk = set(hf_routers(trainer.compute)) | set(hf_routers(engine.model))
    for mod, inp, out in t_seen + e_seen:
        assert inp.dtype == torch.bfloat16  # the residual stream stays in the model dtype
        logits = F.linear(inp.float(), mod.weight)  # fp32 gate logits of the bf16 hidden states
        if mod in topk:
            assert out.dtype == torch.float32 and torch.equal(out, logits)
        else:  # Qwen2-MoE's shared_expert_gate: fp32 logits rounded back to the stream's dtype
            assert out.dtype == torch.bfloat16 and torch.equal(out, logits.to(torch.bfloat16))
    assert len(t_seen) >= 2 and len(e_seen) >= 2
    assert trainer.routing.logits_dtypes == engine.routing.logits_dtypes == {torch.float32}
    assert trainer.audit() == [] and engine.audit() == []


def test_fp32_router_changes_the_routing_computation():
    """The same weights with a bf16 router: the gate logits differ (bf16 GEMM), so the setting is not ignored."""
    _, fp32 = _pair(QWEN3)
    _, bf16 = _pair(QWEN3, PrecisionPolicy.from_name("bf16"))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a = fp32.compute.model.layers[0].mlp.gate(x)
    b = bf16.compute.model.layers[0].mlp.gate(x)
    assert a[0].dtype == torch.float32 and b[0].dtype == torch.bfloat16
    assert not torch.equal(a[0], b[0].float())


def test_a_gate_computing_below_router_dtype_is_refused_while_running():
    """A gate left in bf16 under router_dtype=float32 (what an engine that ignored the key would do): the audit
    names the weight and the gate-logit dtype, and both engines refuse at their first forward."""
    engine, trainer = _pair(QWEN3)
    for model in (trainer.compute, engine.model):
        gate = model.model.layers[0].mlp.gate
        gate.weight.data = gate.weight.data.to(torch.bfloat16)
    with pytest.raises(PrecisionMismatchError, match=r"gate logits found bfloat16, expected float32 \(router_dtype\)"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, num_generations=1, seed=1))
    lines = engine.audit()
    assert any("mlp.gate.weight: found bfloat16, expected float32 (router_dtype)" in x for x in lines), lines
    engine2, _ = _pair(QWEN3)
    batch = engine2.generate(PROMPTS, SamplingParams(max_new_tokens=3, num_generations=1, seed=1))
    with pytest.raises(PrecisionMismatchError, match="<router compute>: gate logits found bfloat16"):
        trainer.logprobs(batch, 1.0)


@pytest.mark.parametrize("trainer,rollout", [("torch", "torch"), ("megatron", "torch")])
def test_validation_accepts_an_fp32_router_where_it_is_honoured(trainer, rollout):
    for name in ("fp16", "bf16"):
        assert precision_problems({"name": name, "router_dtype": "float32"}, trainer, rollout) == []


def test_validation_refuses_what_is_not_honoured():
    (line,) = precision_problems({"name": "bf16", "router_dtype": "float32"}, "torch", "vllm")
    assert "'precision.router_dtype': float32" in line and "rollout.backend=vllm" in line
    assert "no router-logits dtype setting" in line
    # a declared trainer/rollout ablation: the fp32 router applies to the vLLM side too, refused once
    (line,) = precision_problems({"name": "bf16", "allow_mismatch": True, "rollout": "fp16", "router_dtype": "float32"},
                                 "torch", "vllm")
    assert "rollout.backend=vllm" in line and "(float16)" in line
    (line,) = precision_problems({"name": "fp16", "router_dtype": "bfloat16"}, "torch", "torch")
    assert "'precision.router_dtype': bfloat16" in line and "allowed: null, float32 or =" in line


def test_moe_tiny_run_with_an_fp32_router_passes_validation(tmp_path):
    rc = typed(load_recipe("moe_tiny", [f"output_dir={tmp_path}/run", "precision=bf16",
                                        "precision.router_dtype=float32"]))
    check_run(rc)
