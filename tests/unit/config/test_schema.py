"""The schema refuses bad input loudly: one line per problem naming the key (`config/schema.py`)."""

import pytest
from omegaconf import OmegaConf

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.plan import parallel_layout


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


def test_rehearse_options_under_rl_point_to_the_rehearse_command():
    """`rl ... rehearse.steps=3` suggested 'reward'; the key belongs to another command."""
    with pytest.raises(ConfigError, match=r"unknown key 'rehearse' .*; rehearse\.\* options belong to the rehearse "
                                          r"command: nemo-rl-fp16 rehearse recipe=\.\.\. rehearse\.steps=N"):
        typed(load_recipe("sanity_tiny", ["rehearse.steps=3"]))
