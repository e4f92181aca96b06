"""Recipes load, compose `defaults:`, take overrides and save (`config/loading.py`)."""

import pytest
import torch

from nemo_rl_fp16.config import ConfigError, available_recipes, load_recipe, save_resolved, typed
from nemo_rl_fp16.plan import make_plan
from nemo_rl_fp16.precision import resolve_policies


@pytest.mark.parametrize("name", available_recipes())
def test_gpu_recipes_roll_out_with_vllm(name):
    """A recipe that declares GPUs samples with vLLM, not the CPU reference sampler (a host sync per token)."""
    cfg = typed(load_recipe(name))
    assert cfg.cluster.gpus_per_node == 0 or cfg.rollout.backend == "vllm", name


@pytest.mark.parametrize("name", available_recipes())
def test_every_packaged_recipe_loads_and_plans(name, monkeypatch):
    from nemo_rl_fp16.policy.megatron import attention

    # the GPU recipes' sequence parallelism needs Transformer Engine, which their machines have
    # (without it the plan refuses them: test_megatron_plan.py::test_big_recipes_refused_without_te)
    monkeypatch.setattr(attention, "te_available", lambda: True)
    cfg = typed(load_recipe(name))
    assert cfg.recipe == name
    plan = make_plan(cfg)  # layouts of shipped recipes divide, precision blocks resolve
    # the plan is this recipe's: its name, algorithm, and each engine in the precision the recipe resolves to
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    train, rollout = resolve_policies(cfg.precision.model_dump())
    assert plan["recipe"] == name and plan["algorithm"].startswith(f"{cfg.algorithm.name} + correction ")
    assert plan["trainer"].startswith(f"{cfg.policy.backend}  dtypes: param={short[train.param_dtype]},")
    assert plan["rollout"].startswith(f"{cfg.rollout.backend}  dtypes: param={short[rollout.param_dtype]},")
    assert (plan["loss scaling"] == "off") is (not train.loss_scale.enabled)


def test_required_recipes_ship():
    assert {"base", "grpo_fp16", "grpo_bf16", "sanity_tiny"} <= set(available_recipes())


def test_defaults_composition_and_interpolation():
    cfg = load_recipe("grpo_bf16")
    assert cfg.precision.name == "bf16"
    assert cfg.rollout.max_new_tokens == 4096  # inherited from grpo_fp16
    assert cfg.output_dir == "outputs/grpo_bf16/bf16_grpo"  # recipe / precision _ algorithm: runs never collide


def test_overrides_and_preset_swap():
    cfg = load_recipe("grpo_fp16", ["trainer.max_steps=3", "precision=bf16", "algorithm.correction=mis"])
    assert cfg.trainer.max_steps == 3 and cfg.precision.name == "bf16" and cfg.algorithm.correction == "mis"
    cfg = load_recipe("grpo_fp16", ["precision.rollout=bf16", "precision.allow_mismatch=true", "precision=fp32"])
    assert cfg.precision.name == "fp32" and cfg.precision.rollout == "bf16"  # ablation settings kept


def test_unknown_recipe_and_yaml_path(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'grpo_fp16'"):
        load_recipe("grpo_fp61")
    p = tmp_path / "mine.yaml"
    p.write_text("defaults: [sanity_tiny]\ntrainer: {max_steps: 7}\n")
    cfg = load_recipe(str(p))
    assert cfg.recipe == "mine" and cfg.trainer.max_steps == 7 and cfg.model.config.hidden_size == 128
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse recipe"):
        load_recipe(str(bad))


def test_save_resolved_round_trips(tmp_path):
    cfg = load_recipe("sanity_tiny", ["seed=7"])
    path = save_resolved(cfg, tmp_path / "run")
    assert load_recipe(str(path)).seed == 7
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
