"""Atomic checkpoints: bitwise round trip, corruption detection, completeness, pruning, RNG."""

import json
import os
import random

import numpy as np
import pytest
import torch

from nemo_rl_fp16.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from nemo_rl_fp16.runtime import capture_rng, restore_rng


def _payload(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = {
        "w": torch.randn(4, 3, generator=g),
        "h": torch.randn(5, generator=g).half(),
        "b": torch.randn(3, generator=g).bfloat16(),
    }
    model["tied"] = model["w"]  # shared storage must survive safetensors
    trainer = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, generator=g)}},
            "param_groups": [{"lr": 1e-3, "params": [0], "betas": (0.9, 0.999)}],
        },
        "scaler": {"scale": 65536.0, "growth_tracker": 2, "hysteresis_tracker": 1},
    }
    return dict(
        model_state=model,
        trainer_state=trainer,
        rng=capture_rng(),
        data_state={"epoch": 1, "cursor": 7, "order": [3, 1, 2]},
        meta={"recipe": "t"},
    )


def test_round_trip_is_bitwise(tmp_path):
    p = _payload()
    path = save_checkpoint(tmp_path, 5, **p)
    assert path == tmp_path / "step_000005" and sorted(f.name for f in path.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "trainer_state.pt",
    ]
    out = load_checkpoint(path)
    assert out["step"] == 5 and out["meta"] == {"recipe": "t"} and out["data_state"] == p["data_state"]
    for k, v in p["model_state"].items():
        assert out["model_state"][k].dtype == v.dtype and torch.equal(out["model_state"][k], v)
    opt = out["trainer_state"]["optimizer"]
    assert torch.equal(opt["state"][0]["exp_avg"], p["trainer_state"]["optimizer"]["state"][0]["exp_avg"])
    assert opt["param_groups"] == p["trainer_state"]["optimizer"]["param_groups"]
    assert out["trainer_state"]["scaler"] == p["trainer_state"]["scaler"]
    torch.load(path / "trainer_state.pt", weights_only=True)  # no pickle of arbitrary objects
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "trainer_state.pt"}


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_flipped_byte_is_detected(tmp_path, name):
    path = save_checkpoint(tmp_path, 1, **_payload())
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "checksum mismatch" in msg and str(f) in msg and "\n" not in msg


def test_truncated_and_missing_files(tmp_path):
    path = save_checkpoint(tmp_path, 1, **_payload())
    (path / "trainer_state.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_checkpoint(path)
    assert latest_checkpoint(tmp_path) is None  # incomplete: not offered for resume
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(path)


def test_latest_ignores_temp_and_incomplete(tmp_path):
    save_checkpoint(tmp_path, 2, **_payload())
    (tmp_path / ".tmp_step_9_1234").mkdir()  # crashed writer
    (tmp_path / ".tmp_step_9_1234" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step_000008").mkdir()  # incomplete: no meta.json
    (tmp_path / "step_000007").mkdir()
    (tmp_path / "step_000007" / "meta.json").write_text("{truncated")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_keep_last_prunes_after_save(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, keep_last=2, **_payload(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    save_checkpoint(tmp_path, 4, keep_last=2, **_payload(9))  # re-save of an existing step replaces it
    assert torch.equal(load_checkpoint(tmp_path / "step_000004")["model_state"]["w"], _payload(9)["model_state"]["w"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unserialisable_state_fails_at_save(tmp_path):
    p = _payload()
    p["data_state"] = {"order": np.arange(3)}
    with pytest.raises(CheckpointError, match=r"data_state.*order.*ndarray"):
        save_checkpoint(tmp_path, 1, **p)
    assert list(tmp_path.iterdir()) == []


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng()
    draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    path = save_checkpoint(tmp_path, 1, **{**_payload(), "rng": state})
    random.random(), np.random.rand(5), torch.rand(7)  # advance everything
    restore_rng(load_checkpoint(path)["rng"])
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])



def test_replace_dir_swaps_a_folder_in_whole(tmp_path):
    from nemo_rl_fp16.checkpoint import replace_dir

    old, new = tmp_path / "step_000001", tmp_path / ".tmp_step_1_9"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_dir(new, old)
    assert sorted(os.listdir(tmp_path)) == ["step_000001"]  # no .old_* or temp folder left
    assert sorted(os.listdir(old)) == ["b"] and (old / "b").read_text() == "new"
    fresh = tmp_path / ".tmp_step_2_9"
    fresh.mkdir()
    replace_dir(fresh, tmp_path / "step_000002")
    assert (tmp_path / "step_000002").is_dir() and not fresh.exists()
