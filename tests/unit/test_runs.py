"""Runs you can trust: run identity, default output folders, stale temp folders.

The tests that go through the CLI in a subprocess, as a user hits them (resume, the folder lock,
corrupt checkpoints, folder errors, kill -9), are in tests/integration/test_runs_cli.py.
"""

import os

from omegaconf import OmegaConf

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.config import load_recipe
from nemo_rl_fp16.runs import NOT_IDENTITY, identity_diff, run_identity

# --------------------------------------------------------------------------------- identity


def _identity(*overrides):
    return run_identity(OmegaConf.to_container(load_recipe("sanity_tiny", list(overrides)), resolve=True))


def test_identity_covers_training_keys_and_only_those():
    base = _identity()
    assert base == _identity("trainer.max_steps=7", "trainer.save_every=3", "logging.jsonl=false",
                             "output_dir=/elsewhere", "cluster.ray.enabled=true", "trainer.keep_last=5")
    for override, key in [("precision=bf16", "precision.name"), ("algorithm.name=gspo", "algorithm.name"),
                          ("seed=7", "seed"), ("data.seed=3", "data.seed"), ("policy.lr=1e-5", "policy.lr"),
                          ("policy.lora.enabled=true", "policy.lora.enabled"),
                          ("model.config.hidden_size=64", "model.config.hidden_size"),
                          ("precision.loss_scale.initial_scale=1024", "precision.loss_scale.initial_scale")]:
        other = _identity(override)
        assert other["fingerprint"] != base["fingerprint"], override
        assert any(line.startswith(key + ":") for line in identity_diff(base, other)), (override, identity_diff(base, other))
    # every key not declared operational is part of the identity
    assert not any(k.startswith(p) for k in base["keys"] for p in NOT_IDENTITY)
    assert {"seed", "precision.name", "algorithm.name", "policy.lr", "data.dataset", "reward.name"} <= set(base["keys"])


def test_default_output_dirs_differ_by_precision_and_algorithm():
    dirs = {load_recipe("sanity_tiny", o).output_dir for o in ([], ["precision=bf16"], ["algorithm.name=gspo"],
                                                                 ["precision=fp32", "algorithm.name=pg_seq_is"])}
    assert len(dirs) == 4 and all(d.startswith("outputs/sanity_tiny/") for d in dirs)


# --------------------------------------------------------------------------------- lock


# --------------------------------------------------------------------------------- checkpoints


def _save(root, step, value=0.0):
    import torch

    return ckpt.save_checkpoint(root, step, model_state={"w": torch.full((4,), value)}, trainer_state={},
                                rng={}, data_state={"step": step}, keep_last=None)


def test_clean_stale_removes_temps_and_finishes_an_interrupted_resave(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    final = _save(root, 2, 1.0)
    # a re-save of step 2 killed between its two renames: old moved out, new still in its temp
    new = _save(tmp_path / "scratch", 2, 2.0)
    os.replace(final, root / ".old_step_000002_999")
    os.replace(new, root / ".tmp_step_2_999")
    (root / ".tmp_step_7_123").mkdir()  # a save killed mid-way
    assert ckpt.list_checkpoints(root)[-1].name == "step_000001"
    done = ckpt.clean_stale(root)
    assert "finished the interrupted re-save of step_000002" in done[0]
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]
    assert ckpt.load_checkpoint(root / "step_000002")["model_state"]["w"][0] == 2.0  # the newer one
    # only the old copy survived (the temp was incomplete): it is put back, not lost
    os.replace(root / "step_000002", root / ".old_step_000002_5")
    (root / ".tmp_step_2_5").mkdir()
    ckpt.clean_stale(root)
    assert ckpt.load_checkpoint(root / "step_000002")["model_state"]["w"][0] == 2.0


# --------------------------------------------------------------------------------- docs in sequence


