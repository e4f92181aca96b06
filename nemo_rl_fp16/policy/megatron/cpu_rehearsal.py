"""megatron-core on CPU (gloo): the redirects of its hard-coded CUDA calls, for rehearsals and tests.

megatron-core (0.16.1) calls CUDA in a few places even when every tensor is on the CPU: the
current device (`torch.cuda.current_device`), the model-parallel RNG tracker's CUDA RNG state
(`tensor_parallel.random._get/_set_cuda_rng_state`, `torch.cuda.manual_seed/get_rng_state`),
`torch.cuda.synchronize` before a distributed-checkpoint save, a tied embedding's `.cuda()` copy
(PP) and the pipeline schedules' token count in a `zeros(..., device="cuda")` tensor. This module
sends each to its CPU counterpart, so the megatron backend runs forward, backward and its
collectives on CPU over gloo: slow, and meant for layout rehearsals (`scripts/rehearse.py`) and
tests, not for training.

Two ways in, never both meaning "CUDA" in one process:

- `enable_for_process()`: the megatron backend calls it when its device is `cpu`
  (`MegatronPolicy`); the redirects stay for the life of the process (a Ray trainer actor, a
  torchrun worker, a one-process CPU run). It refuses when CUDA is already initialised here.
- `cpu_redirects()`: the same redirects undone on exit (an `ExitStack`), for tests.

`MegatronPolicy` on CUDA calls `check_cuda_clean()`, which refuses while the redirects are in
place, so they cannot leak into a CUDA run silently.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["check_cuda_clean", "cpu_redirects", "enable_for_process", "ep_spans_data_parallel", "redirected"]


class _TorchOnCPU:
    """`torch` for megatron's pipeline schedules module, with `zeros(..., device="cuda")` made on the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def _current_device() -> str:
    return "cpu"


def _get_rng_state(*_a: Any, **_k: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def _synchronize(*_a: Any, **_k: Any) -> None:
    return None


def _set_rng_state(state: torch.Tensor, *_a: Any, **_k: Any) -> None:
    torch.set_rng_state(state)


def _tensor_cuda(self: torch.Tensor, *_a: Any, **_k: Any) -> torch.Tensor:
    return self


_SCHEDULES_TORCH = _TorchOnCPU()


def _patches() -> list[tuple[Any, str, Any]]:
    """(object, attribute, CPU replacement) for every redirect."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    return [
        (torch.cuda, "current_device", _current_device),
        (torch.cuda, "get_rng_state", _get_rng_state),
        (torch.cuda, "manual_seed", _manual_seed),
        (torch.cuda, "synchronize", _synchronize),  # dist_checkpointing's save syncs before writing
        (mrandom, "_get_cuda_rng_state", _get_rng_state),
        (mrandom, "_set_cuda_rng_state", _set_rng_state),
        (torch.Tensor, "cuda", _tensor_cuda),  # a tied embedding's last-stage copy (PP) is synced on .cuda()
        (schedules, "torch", _SCHEDULES_TORCH),  # the pipeline schedules count tokens in a device="cuda" tensor
    ]


def redirected() -> bool:
    """Whether megatron-core's CUDA calls are redirected to the CPU in this process now.

    Returns:
        bool: True when every redirect is in place.
    """
    return all(getattr(obj, name) is fn for obj, name, fn in _patches())


def cpu_redirects() -> contextlib.ExitStack:
    """Redirect megatron-core's CUDA calls to the CPU until the returned stack closes (tests).

    Redirects already in place (`enable_for_process`) are left as they are and not undone.

    Returns:
        contextlib.ExitStack: closing it (or leaving its `with` block) restores what it replaced.
    """
    stack = contextlib.ExitStack()
    for obj, name, fn in _patches():
        old = getattr(obj, name)
        if old is fn:
            continue
        setattr(obj, name, fn)
        stack.callback(setattr, obj, name, old)
    return stack


def enable_for_process() -> None:
    """Redirect megatron-core's CUDA calls to the CPU for the rest of this process (idempotent).

    Called by the megatron backend when its device is `cpu` (a rehearsal or test process).

    Raises:
        RuntimeError: CUDA is already initialised in this process (a CUDA model here would see
            the redirects); run the CPU megatron engine in its own process.
    """
    if redirected():
        return
    if torch.cuda.is_initialized():
        raise RuntimeError("megatron on CPU redirects megatron-core's CUDA calls for the whole process, and this "
                           "process has already initialised CUDA; run the CPU megatron engine in its own process "
                           "(a Ray actor or torchrun worker) or set device=cuda")
    cpu_redirects()  # never closed: the process keeps the redirects


def check_cuda_clean() -> None:
    """Refuse a CUDA megatron model in a process whose megatron-core CUDA calls are redirected.

    Raises:
        RuntimeError: the CPU redirects (`enable_for_process`/`cpu_redirects`) are in place here.
    """
    if any(getattr(obj, name) is fn for obj, name, fn in _patches()):
        raise RuntimeError("megatron on CUDA in a process where megatron-core's CUDA calls are redirected to the CPU "
                           "(policy.megatron.cpu_rehearsal); run CPU and CUDA megatron engines in separate processes")


def ep_spans_data_parallel() -> bool:
    """Whether this rank's expert-parallel group reaches ranks outside its TP group (ranks with other rows).

    On CPU megatron runs the allgather MoE token dispatcher (`model.transformer_config`), which
    gathers tokens over the TP x EP group with equal sizes only; when that group spans
    data-parallel ranks, their micro-batches must have one width, so the megatron policy then does
    not trim them to their own length (`policy.trim`). E.g. TP 2 x DP 4 with EP 4: EP groups
    [0..3], [4..7] span two TP groups each. The GPU path's alltoall dispatcher takes unequal counts.

    Returns:
        bool: True when the EP group is not inside the TP group (megatron's parallel state must be up).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_expert_model_parallel_world_size() == 1:
        return False
    ep = set(dist.get_process_group_ranks(ps.get_expert_model_parallel_group()))
    tp = set(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()))
    return not ep <= tp
