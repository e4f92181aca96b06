"""Test-only CUDA redirects that let megatron-core (0.16.1 here) run forward and backward on CPU.

megatron-core hard-codes a few CUDA calls (current device, the model-parallel RNG tracker's CUDA
RNG state). Tests redirect them to the CPU; the package never does. `cpu_redirects()` is a plain
function so torchrun worker processes (which pytest fixtures do not reach) can apply it too.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

try:
    import megatron.core  # noqa: F401

    HAVE_MCORE = True
except Exception:  # pragma: no cover - megatron-core not installed
    HAVE_MCORE = False


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


class _TorchOnCPU:
    """`torch` for megatron's pipeline schedules module, with `zeros(..., device="cuda")` made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def cpu_redirects() -> contextlib.ExitStack:
    """Patch the CUDA calls megatron-core makes on CPU; returns an ExitStack that undoes them."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    stack = contextlib.ExitStack()
    patches = [
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed)),
        (torch.cuda, "synchronize", lambda *a, **k: None),  # dist_checkpointing's save syncs before writing
        (mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        (mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (torch.Tensor, "cuda", lambda self, *a, **k: self),  # a tied embedding's last-stage copy (PP) is synced on .cuda()
        (schedules, "torch", _TorchOnCPU()),  # the pipeline schedules count tokens in a device="cuda" tensor
    ]
    for obj, name, fn in patches:
        old = getattr(obj, name)
        setattr(obj, name, fn)
        stack.callback(setattr, obj, name, old)
    return stack


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


__all__ = ["cpu_redirects", "reset_megatron", "free_port", "HAVE_MCORE", "os"]
