"""Dry-run plan for policy.backend=megatron: parameter counts, memory lines, layout refusals.
(No megatron-core needed: the plan works from the HF layout alone.)"""

from __future__ import annotations

import json

import pytest

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.plan import make_plan, parallel_layout
from nemo_rl_fp16.policy.memory import KNOWN_LAYOUTS, ModelLayout, estimate_memory


@pytest.fixture(autouse=True)
def _te_present(monkeypatch):
    """The big recipes run sequence parallelism, which needs Transformer Engine (their GPU machines have it)."""
    from nemo_rl_fp16.policy.megatron import attention

    monkeypatch.setattr(attention, "te_available", lambda: True)


def _plan(recipe, *over):
    return make_plan(typed(load_recipe(recipe, list(over))))


@pytest.mark.parametrize("recipe", ["dense_14b_fp16", "moe_30b_a3b_fp16"])
def test_big_recipes_refused_without_te(recipe, monkeypatch):
    from nemo_rl_fp16.policy.megatron import attention

    monkeypatch.setattr(attention, "te_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        _plan(recipe)
    assert str(e.value).count("\n") == 0 and "policy.sequence_parallel=true needs Transformer Engine" in str(e.value)
    assert "which is not installed;" in str(e.value)  # an environment line: the docs' dry runs accept it
    assert "WrappedTorchNorm" in str(e.value)
    _plan(recipe, "policy.sequence_parallel=false")  # the fix the line names plans


def test_dense_14b_plan():
    plan = _plan("dense_14b_fp16")
    assert plan["layout"] == "world 8 = TP 4 x PP 1 x CP 1 x DP 2 (EP 1)"  # Ray split: 8 of 16 GPUs train
    assert plan["placement"].startswith("Ray split: 8 trainer ranks + 2 rollout engines in 10 bundles (CPU 10, GPU 16)")
    assert plan["parameters"].startswith("14.77B total; 3.69B per GPU")
    assert "weights 6.9 GiB" in plan["memory/GPU"] and "grads 13.8 GiB" in plan["memory/GPU"]
    assert plan["trainer"].startswith("megatron")


def test_distributed_optimizer_is_the_plan_memory_figure():
    """CUDA default: megatron's distributed optimizer (the 30B-A3B recipe fits 80 GB per GPU only with it)."""
    on, off = _plan("moe_30b_a3b_fp16")["memory/GPU"], _plan("moe_30b_a3b_fp16", "policy.use_distributed_optimizer=false")["memory/GPU"]
    assert "= 48.9 GiB (policy.use_distributed_optimizer=true; 76.7 GiB with it off)" in on, on
    assert "optimizer 21.3 GiB" in on and "optimizer = fp32 master + Adam, sharded over DP" in on
    assert "= 76.7 GiB (policy.use_distributed_optimizer=false; 48.9 GiB with it on)" in off, off
    with pytest.raises(ConfigError, match="'policy.use_distributed_optimizer': true; allowed: null") as e:
        _plan("sanity_tiny", "policy.use_distributed_optimizer=true")  # torch backend: refused, not ignored
    assert "\n" not in str(e.value)


def test_moe_30b_plan():
    plan = _plan("moe_30b_a3b_fp16")
    assert plan["layout"] == "world 16 = TP 2 x PP 1 x CP 1 x DP 8 (EP 8)"
    assert "16 trainer ranks + 4 rollout engines" in plan["placement"] and "GPU 32" in plan["placement"]
    assert plan["parameters"].startswith("30.53B total, 3.35B active/token (128 experts, top-8)")


@pytest.mark.parametrize("over, msg", [
    (("policy.tensor_parallel_size=3", "cluster.gpus_per_node=6"), "attention heads (40) not divisible by"),
    (("policy.tensor_parallel_size=5", "cluster.nodes=5"), "key/value heads (8) not divisible by"),
    (("policy.pipeline_parallel_size=5", "policy.tensor_parallel_size=1", "cluster.nodes=5"),
     "layers (48) not divisible by policy.pipeline_parallel_size=5"),
    (("policy.expert_parallel_size=2",), "needs an MoE model"),
])
def test_dense_layout_refusals(over, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parallel_layout(typed(load_recipe("dense_14b_fp16", list(over))))


def test_tp_above_kv_heads_is_allowed_when_a_multiple():
    """Qwen3-30B-A3B has 4 kv heads: TP 8 runs in megatron-core (K/V gathered per query group)."""
    layout = parallel_layout(typed(load_recipe("moe_30b_a3b_fp16", ["policy.tensor_parallel_size=8",
                                                                   "policy.expert_parallel_size=2"])))
    assert layout.tp == 8


def test_unmapped_hf_feature_is_refused_by_the_plan():
    with pytest.raises(ConfigError, match="rope_type='yarn' is not mapped to megatron"):
        parallel_layout(typed(load_recipe("sanity_tiny", [
            "policy.backend=megatron", "+model.config.rope_parameters={rope_type: yarn, rope_theta: 10000.0, factor: 4.0}"])))


def test_experts_must_divide_by_ep():
    with pytest.raises(ConfigError, match=r"experts \(128\) not divisible by policy.expert_parallel_size=3"):
        parallel_layout(typed(load_recipe("moe_30b_a3b_fp16", ["policy.expert_parallel_size=3",
                                                               "cluster.gpus_per_node=6"])))


def test_layout_from_model_config_and_local_folder(tmp_path):
    plan = _plan("sanity_tiny", "policy.backend=megatron", "device=cuda")
    assert "per GPU (layout from model.config)" in plan["parameters"]
    (tmp_path / "config.json").write_text(json.dumps(KNOWN_LAYOUTS["Qwen/Qwen3-30B-A3B"]))
    plan = _plan("moe_30b_a3b_fp16", f"model.name_or_path={tmp_path}")
    assert f"layout from {tmp_path}/config.json" in plan["parameters"]
    plan = _plan("grpo_fp16", "policy.backend=megatron", "model.name_or_path=/nonexistent/model")
    assert plan["parameters"].startswith("unknown")


def test_memory_estimate_scales_with_parallelism():
    lay = ModelLayout.from_hf_config(KNOWN_LAYOUTS["Qwen/Qwen2.5-14B"])
    kw = dict(pp=1, ep=1, param_bytes=2, micro_batch=1, seq=4096)
    one, four = estimate_memory(lay, tp=1, dp=1, **kw), estimate_memory(lay, tp=4, dp=4, **kw)
    assert one.params_local == lay.num_parameters()["total"]
    assert four.weights == pytest.approx(one.weights / 4)
    assert four.optimizer_distributed == pytest.approx(one.optimizer / 16)
    assert estimate_memory(lay, tp=4, dp=4, recompute=True, **kw).activations < four.activations


def test_megatron_on_cpu_is_a_rehearsal_the_plan_names():
    """megatron on CPU builds (gloo, CUDA calls redirected: `cpu_rehearsal`), and the dry-run plan says it is a
    rehearsal mode; on CUDA the note is absent."""
    from nemo_rl_fp16.assembly import check_policy_backend
    from nemo_rl_fp16.plan import make_plan
    from nemo_rl_fp16.plan_lines import CPU_MEGATRON_NOTE

    pytest.importorskip("megatron.core")
    cpu = typed(load_recipe("sanity_tiny", ["policy.backend=megatron", "device=cpu"]))
    check_policy_backend(cpu)  # no refusal
    assert make_plan(cpu)["megatron on CPU"] == CPU_MEGATRON_NOTE and "REHEARSAL" in CPU_MEGATRON_NOTE
    cuda = typed(load_recipe("sanity_tiny", ["policy.backend=megatron", "device=cuda"]))
    assert "megatron on CPU" not in make_plan(cuda)
