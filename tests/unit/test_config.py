"""Recipes load, compose, override and fail loudly on bad input."""

import pytest
from omegaconf import OmegaConf

from nemo_rl_fp16.config import ConfigError, available_recipes, load_recipe, save_resolved, typed
from nemo_rl_fp16.plan import make_plan, parallel_layout


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
    make_plan(cfg)  # layouts of shipped recipes divide, precision blocks resolve


def test_required_recipes_ship():
    assert {"base", "grpo_fp16", "grpo_bf16", "sanity_tiny"} <= set(available_recipes())


def test_base_yaml_documents_every_key():
    """Every schema key appears in base.yaml (which is what users read)."""
    from nemo_rl_fp16.config import RecipeConfig, recipes_dir

    raw = OmegaConf.load(recipes_dir() / "base.yaml")

    def walk(model, node, prefix):
        for key, field in model.model_fields.items():
            assert key in node, f"base.yaml lacks {prefix}{key}"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields") and node[key] is not None:
                walk(sub, node[key], f"{prefix}{key}.")

    walk(RecipeConfig, raw, "")


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


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.max_stepz=3", "unknown key 'trainer.max_stepz' (value 3); did you mean 'trainer.max_steps'?"),
        ("precision.name=fp8", "bad value for 'precision.name': 'fp8'; allowed: 'fp16', 'bf16' or 'fp32'"),
        ("trainer.max_steps=many", "bad value for 'trainer.max_steps': 'many'"),
        ("algorithm.reduction=sum", "allowed: 'token_mean', 'seq_mean_token_mean' or 'seq_mean_token_sum'"),
        ("algorithm.name=gspo", None),
        ("precision=fp8", "bad value for 'precision': 'fp8'; allowed: fp16, bf16, fp32"),
        ("rollout.top_p=1.5", "bad value for 'rollout.top_p': 1.5"),
        ("noequals", "not key=value"),
        ("polcy.lr=1", "did you mean 'policy'?"),
    ],
)
def test_override_errors(override, expected):
    if expected is None:  # valid on its own
        load_recipe("grpo_fp16", [override])
        return
    with pytest.raises(ConfigError) as e:
        load_recipe("grpo_fp16", [override])
    assert expected in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_cross_field_errors_are_all_reported():
    with pytest.raises(ConfigError) as e:
        load_recipe("grpo_fp16", ["algorithm.name=gspo", "algorithm.correction=tis", "trainer.max_stepz=1",
                                  "model.config={model_type: qwen2}"])
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert any("correction=tis" in x and "grpo" in x for x in lines)
    assert any("exactly one of model.name_or_path" in x for x in lines)


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


def test_layout_validation():
    with pytest.raises(ConfigError, match="need policy.backend=megatron"):
        parallel_layout(typed(load_recipe("grpo_fp16", ["policy.tensor_parallel_size=2"])))
    cfg = typed(load_recipe("grpo_fp16", ["policy.backend=megatron", "policy.tensor_parallel_size=3"]))
    with pytest.raises(ConfigError, match="not divisible by TP x PP x CP = 3"):
        parallel_layout(cfg)
    cfg = typed(load_recipe("grpo_fp16", ["policy.backend=megatron", "policy.tensor_parallel_size=2",
                                          "cluster.nodes=2"]))
    lay = parallel_layout(cfg)
    assert (lay.world_size, lay.tp, lay.dp) == (16, 2, 8)


def test_save_resolved_round_trips(tmp_path):
    cfg = load_recipe("sanity_tiny", ["seed=7"])
    path = save_resolved(cfg, tmp_path / "run")
    assert load_recipe(str(path)).seed == 7
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
