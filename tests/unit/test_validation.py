"""The validation stage (`plan.check_run`): every listed bad value is refused before any work, exit 2,
one line naming the key, the value, the allowed values and the fix; dry run and real run agree."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from nemo_rl_fp16.cli import main
from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.plan import check_run, make_plan, run_device
from nemo_rl_fp16.precision import PrecisionPolicy, resolve_policies


def _tiny(tmp_path, *over):
    return ["recipe=sanity_tiny", f"output_dir={tmp_path}/run", "warm_start.enabled=false",
            "logging.progress=false", "logging.tensorboard=false", *over]


MEGATRON = "policy.backend=megatron device=cuda cluster.gpus_per_node=2"  # a layout PP/CP 2 would divide
# (overrides, key the line must name, text naming the allowed values / the fix)
FAULTS = [
    ("seed=-1", "'seed': -1", "greater than or equal to 0"),
    ("data.dataset=foo", "'data.dataset': 'foo'", "allowed: sanity_add, sanity_add_steps, sanity_reverse, jsonl"),
    ("model.config.vocab_size=abc", "'model.config.vocab_size': 'abc'", "expected int"),
    ("precision.master_dtype=float16", "'precision.master_dtype': float16", "allowed: null or float32"),
    ("mismatch.length_buckets=[]", "'mismatch.length_buckets'", "at least 1 item"),
    ("precision.loss_scale.min_scale=1e6", "'precision.loss_scale.min_scale': 1e+06",
     "min_scale <= initial_scale (here 1e+06 > 65536)"),
    ("policy.lr=inf", "'policy.lr': 'inf'", "a finite number"),
    ("precision.loss_scale.initial_scale=inf", "'precision.loss_scale.initial_scale': 'inf'", "a finite number"),
    ("precision.compute_dtype=float32", "'precision.compute_dtype': float32", "= param_dtype (float16)"),
    ("model.config.max_position_embeddings=4", "'data.dataset': prompt #", "shorter than the model's context "
                                                                          "(max_position_embeddings=4)"),
    (MEGATRON + " policy.context_parallel_size=2", "'policy.context_parallel_size': 2", "allowed: 1"),
    ("precision.kv_cache_dtype=float32", "'precision.kv_cache_dtype': float32", "rollout's param_dtype"),
    ("precision.router_dtype=bfloat16", "'precision.router_dtype': bfloat16", "float32 or = the trainer's param_dtype (float16)"),
    ("trainer.resume=/no/such/ckpt", "'trainer.resume': '/no/such/ckpt' does not exist", "checkpoint folder"),
]


@pytest.mark.parametrize("override,key,allowed", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_listed_fault_is_one_line_exit_2_before_any_work(tmp_path, capsys, override, key, allowed):
    for dry in ("true", "false"):  # the dry run and the real run refuse alike
        code = main(["rl", *_tiny(tmp_path, *override.split()), f"dry_run={dry}"])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2, (override, dry, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0] and allowed in lines[0], lines
        assert out == ""
        assert not (tmp_path / "run").exists()  # nothing written: no work started


def test_wandb_without_the_package_is_refused(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["rl", *_tiny(tmp_path, "logging.wandb.enabled=true"), "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: bad value for 'logging.wandb.enabled': true needs the 'wandb' package, which is not "
                   "installed; pip install wandb or change logging.wandb.enabled"]


def test_megatron_scaler_keys_refused_where_megatron_ignores_them():
    base = ["policy.backend=megatron", "device=cuda"]
    for over in (["precision.loss_scale.growth_factor=4"], ["precision.loss_scale.backoff_factor=0.25"],
                 ["precision=bf16", "precision.loss_scale.enabled=true"]):
        with pytest.raises(ConfigError) as e:
            load_recipe("sanity_tiny", [*base, *over])
        key = over[-1].split("=")[0]
        assert f"bad value for '{key}'" in str(e.value) and len(str(e.value).splitlines()) == 1
    # the torch trainer's scaler takes them: accepted there
    load_recipe("sanity_tiny", ["precision.loss_scale.growth_factor=4", "precision.loss_scale.backoff_factor=0.25"])


# ------------------------------------------------------------------ override order and dtype-driven decisions


@pytest.mark.parametrize("over", [
    ["precision.loss_scale.initial_scale=1024", "precision=fp16"],
    ["precision=fp16", "precision.loss_scale.initial_scale=1024"],
])
def test_preset_first_then_dotted_keys_whatever_the_order(over):
    train, _ = resolve_policies(typed(load_recipe("sanity_tiny", over)).precision.model_dump())
    assert train.loss_scale.initial_scale == 1024


def test_router_override_is_kept_whatever_the_order():
    msgs = set()
    for over in (["precision.router_dtype=float16", "precision=bf16"], ["precision=bf16", "precision.router_dtype=float16"]):
        with pytest.raises(ConfigError) as e:  # kept, and refused (the gates run in bf16 here), not dropped
            load_recipe("sanity_tiny", over)
        msgs.add(str(e.value))
    assert len(msgs) == 1 and "'precision.router_dtype': float16" in msgs.pop()


def test_loss_scaling_follows_the_real_param_dtype():
    p = PrecisionPolicy.from_config({"name": "bf16", "param_dtype": "float16"})
    assert p.param_dtype == torch.float16 and p.loss_scale.enabled
    assert p.compute_dtype == p.router_dtype == p.kv_cache_dtype == torch.float16
    assert not PrecisionPolicy.from_config({"name": "fp16", "param_dtype": "bfloat16"}).loss_scale.enabled
    assert PrecisionPolicy.from_config({"name": "bf16", "loss_scale": {"enabled": True}}).loss_scale.enabled


def test_bf16_preset_with_fp16_weights_keeps_tiny_gradients():
    """The fault: no scaler, ~1e-6 gradients underflow in fp16 to a grad norm of 0. With the scaler they survive."""
    from nemo_rl_fp16.policy import build_policy

    rc = typed(load_recipe("sanity_tiny", ["precision=bf16", "precision.param_dtype=float16"]))
    train, _ = resolve_policies(rc.precision.model_dump())
    trainer = build_policy(rc, rc.model.model_dump(), train, "cpu", None)
    assert trainer.scaler is not None and trainer.scaler.scale == 2.0**16
    from nemo_rl_fp16.interfaces import RolloutBatch

    ids = torch.randint(1, 30, (2, 8))
    batch = RolloutBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.ones(2, 4),
                         rollout_logp=torch.zeros(2, 4), prompt_width=4, prompt_index=torch.arange(2))
    res = trainer.train_step(batch, lambda logp, rows: (logp.sum() * 1e-9, {}), 1.0)
    assert not res.skipped and res.grad_norm > 0.0


def test_ablation_rollout_side_keeps_explicit_dtype_keys():
    over = ["precision.rollout=bf16", "precision.allow_mismatch=true", "precision.logits_dtype=bfloat16"]
    rc = typed(load_recipe("sanity_tiny", over))
    train, roll = resolve_policies(rc.precision.model_dump())
    assert train.param_dtype == torch.float16 and roll.param_dtype == torch.bfloat16
    assert train.logits_dtype == roll.logits_dtype == torch.bfloat16  # not the bare preset's float32
    table = train.dtype_table(roll)
    assert "param_dtype       float16   bfloat16   != MISMATCH" in table
    assert "logits_dtype      bfloat16  bfloat16\n" in table
    assert "bfloat16" in make_plan(rc)["rollout"].replace("bf16", "bfloat16")


def test_one_device_rule_for_plan_build_and_ray(monkeypatch):
    from nemo_rl_fp16.assembly import resolve_device

    cases = [([], "cpu"), (["cluster.gpus_per_node=8", "device=auto"], "cuda"),
             (["cluster.ray.enabled=true", "device=auto"], "cpu")]
    for over, want in cases:
        rc = typed(load_recipe("sanity_tiny", ["device=auto", *over]))
        assert run_device(rc) == want
        assert make_plan(rc)["device"].split()[0] == want
        if want == "cpu" or rc.cluster.ray.enabled:
            assert resolve_device(rc) == want  # what build_run and the Ray driver use
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU box, no cluster declared
    rc = typed(load_recipe("sanity_tiny", ["device=auto"]))
    assert run_device(rc) == resolve_device(rc) == make_plan(rc)["device"].split()[0] == "cuda"


def test_pipeline_parallel_plan_agrees_with_build():
    """PP=2 plans for a dense model (the build runs it: test_megatron_pipeline); MoE with PP is refused in one line."""
    base = ["device=cuda", "policy.backend=megatron", "cluster.gpus_per_node=2"]
    plan = make_plan(typed(load_recipe("sanity_tiny", [*base, "policy.pipeline_parallel_size=2"])))
    assert plan["layout"] == "world 2 = TP 1 x PP 2 x CP 1 x DP 1 (EP 1)"
    with pytest.raises(ConfigError, match="policy.pipeline_parallel_size=2 with an MoE model .*is not implemented"):
        make_plan(typed(load_recipe("moe_tiny", [*base, "policy.pipeline_parallel_size=2"])))


def test_valid_tiny_run_passes_the_stage(tmp_path):
    plan = check_run(typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}", "trainer.eval_every=5"])))
    assert plan["eval"].startswith("every 5 steps") and "pass@4" in plan["eval"]


