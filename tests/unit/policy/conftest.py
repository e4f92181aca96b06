"""Fixtures for megatron-core on CPU: the package's CUDA redirects scoped to one test, parallel-state resets.

megatron-core hard-codes a few CUDA calls (current device, the model-parallel RNG tracker's CUDA
RNG state); the package redirects them to the CPU (`policy.megatron.cpu_rehearsal`). Tests scope
them with `cpu_redirects()` (undone on exit), re-exported here so torchrun worker processes
(which pytest fixtures do not reach) import it with `free_port` and `reset_megatron`.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

try:
    import megatron.core  # noqa: F401

    HAVE_MCORE = True
except Exception:  # pragma: no cover - megatron-core not installed
    HAVE_MCORE = False

from nemo_rl_fp16.policy.megatron.cpu_rehearsal import cpu_redirects  # noqa: E402 (no megatron import at load)


def synthetic_batch(vocab: int, n: int, p: int, t: int, seed: int = 0):
    """A RolloutBatch of random tokens with left-padded prompts and some early-ended responses."""
    from nemo_rl_fp16.interfaces import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, p + t), generator=g)
    attn = torch.ones_like(ids)
    attn[::3, :2] = 0  # left-padded prompts
    resp = torch.ones(n, t, dtype=torch.long)
    resp[1::2, -3:] = 0  # responses that ended early
    attn[:, p:] = resp
    return RolloutBatch(input_ids=ids, attention_mask=attn, response_mask=resp, rollout_logp=torch.zeros(n, t),
                        prompt_width=p, prompt_index=torch.arange(n) // 2)


def reset_megatron() -> None:
    """Tear down megatron parallel state and the single-process group (between tests)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def mcore_cpu():
    """megatron-core on CPU for one test: redirects on, parallel state reset before and after."""
    if not HAVE_MCORE:
        pytest.skip("megatron-core not installed (pip install -e .[megatron])")
    reset_megatron()
    with cpu_redirects():
        yield
        reset_megatron()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *, timeout: int = 600, nproc: int = 2, **env_extra: str) -> str:
    """Run `script` under `torch.distributed.run` (gloo workers, one thread each) and return its output.

    The repository root leads PYTHONPATH, so the workers import this checkout's package. Fails the
    calling test (with the output's tail) when the launch exits non-zero.
    """
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env_extra,
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(Path(script).resolve())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


__all__ = ["cpu_redirects", "reset_megatron", "free_port", "torchrun", "HAVE_MCORE", "os"]
