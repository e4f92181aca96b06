"""A megatron step checkpoint with a distributed `dist/` folder: written atomically, checksummed, resumed exactly.

Single process on CPU (the only layout where the CPU path trains): fp16 with its loss scaler,
two real `train_step`s, `checkpoint.save_checkpoint(sharded=policy.save_sharded)`, a fresh
policy from other weights `load_sharded` from `checkpoint.load_checkpoint(...)["sharded_dir"]`;
the next step's log-probs, weights and loss scale are bitwise those of the uninterrupted run.
A corrupted shard file is caught by the step folder's checksums.
"""

from __future__ import annotations

import pytest
import torch
from test_policy import DENSE, _batch, _loss_fn, _weights

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.runtime import capture_rng

mp = pytest.importorskip("nemo_rl_fp16.policy.megatron.policy")


def test_sharded_step_checkpoint_resumes_bitwise(mcore_cpu, tmp_path):
    from conftest import reset_megatron

    pol = PrecisionPolicy.from_name("fp16")
    b = _batch()
    _, sd = _weights(DENSE)
    a = mp.MegatronPolicy(DENSE, pol, lr=1e-2, micro_batch_size=3, initial_state_dict=sd)
    for _ in range(2):
        assert not a.train_step(b, _loss_fn(b), 1.0).skipped
    path = ckpt.save_checkpoint(tmp_path, 2, model_state=None, sharded=lambda d: a.save_sharded(d, 2),
                                trainer_state={}, rng=capture_rng(), data_state={"step": 2})
    assert not (path / ckpt.MODEL_FILE).exists() and (path / ckpt.SHARDED_DIR / "common.pt").is_file()
    files = ckpt.verify_checkpoint(path)["files"]
    assert any(f.endswith(".distcp") for f in files), files
    r_a = a.train_step(b, _loss_fn(b), 1.0)
    lp_a, w_a, scale_a = a.logprobs(b, 1.0), {k: v.clone() for k, v in a.rollout_state_dict().items()}, a.scaler.scale

    reset_megatron()
    _, sd2 = _weights(DENSE, seed=7)
    c = mp.MegatronPolicy(DENSE, pol, lr=1e-2, micro_batch_size=3, initial_state_dict=sd2)
    data = ckpt.load_checkpoint(path)
    assert data["model_state"] is None
    assert c.load_sharded(data["sharded_dir"])["rng_restored"]
    r_c = c.train_step(b, _loss_fn(b), 1.0)
    assert r_c.grad_norm == r_a.grad_norm and c.scaler.scale == scale_a
    assert torch.equal(c.logprobs(b, 1.0), lp_a)
    w_c = c.rollout_state_dict()
    assert all(torch.equal(w_c[k], w_a[k]) for k in w_a)

    shard = next(p for p in (path / ckpt.SHARDED_DIR).iterdir() if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch in .*distcp"):
        ckpt.load_checkpoint(path)
