"""The `mismatch` command scores with the trainer `policy.backend` names (`policy.build_policy`),
and a backend that cannot run here is refused by the validation stage in one line, before any work;
it honours explicit precision keys on both engines, or refuses them."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16.cli import EXIT_CONFIG, main
from nemo_rl_fp16.commands import mismatch as mismatch_cmd
from nemo_rl_fp16.commands.mismatch import mismatch_policies
from nemo_rl_fp16.config import ConfigError, load_recipe, typed


def test_mismatch_scores_with_the_recipe_backend(tmp_path, monkeypatch):
    built = []
    real = mismatch_cmd.build_policy

    def spy(rc, model_cfg, precision, device, init):
        engine = real(rc, model_cfg, precision, device, init)
        built.append((rc.policy.backend, precision.name, type(engine).__name__))
        return engine

    monkeypatch.setattr(mismatch_cmd, "build_policy", spy)
    cfg = load_recipe("mismatch_tiny", [f"output_dir={tmp_path}/mm", "mismatch.num_prompts=2",
                                        "mismatch.precisions=[fp32,fp16]", "rollout.max_new_tokens=3",
                                        "mismatch.length_buckets=[1,2,3]", "logging.progress=false"])
    report = mismatch_cmd.run_mismatch(cfg, console=Console(quiet=True))
    assert built == [("torch", "fp32", "TorchPolicy"), ("torch", "fp16", "TorchPolicy")]
    assert set(report["runs"]) == {"fp32", "fp16"}


def test_megatron_distributed_optimizer_on_cpu_is_refused_before_any_work(tmp_path, capsys):
    """megatron on CPU is a rehearsal mode (allowed); its distributed optimizer is CUDA-only: one line, nothing written."""
    out = tmp_path / "mm"
    code = main(["mismatch", "recipe=mismatch_tiny", "policy.backend=megatron", "device=cpu",
                 "policy.use_distributed_optimizer=true", f"output_dir={out}"])
    assert code == EXIT_CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'policy.use_distributed_optimizer': true on CPU" in lines[0], lines
    assert not out.exists()


def test_explicit_dtype_keys_reach_both_engines_of_every_precision():
    rc = typed(load_recipe("mismatch_tiny", ["precision.logits_dtype=float16", "mismatch.precisions=[fp16,bf16]"]))
    pols = mismatch_policies(rc)
    assert set(pols) == {"fp16", "bf16"}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        train, rollout = pols[name]
        assert train.param_dtype == rollout.param_dtype == dt
        assert train.logits_dtype == rollout.logits_dtype == torch.float16


@pytest.mark.parametrize("override", ["precision.param_dtype=float16", "precision.rollout=bf16"])
def test_keys_the_sweep_sets_are_refused(override):
    rc = typed(load_recipe("mismatch_tiny", [override, "precision.allow_mismatch=true"]))
    with pytest.raises(ConfigError, match="mismatch.precisions"):
        mismatch_policies(rc)
