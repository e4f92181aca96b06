"""The `ipc` refit transport under Ray: each trainer rank hands the engine on its own bundle a handle per bucket.

Colocated layouts (`placement.py`: rollout engine j shares a bundle, on CUDA the GPU, with one
trainer rank) with `rollout.refit_transport=ipc` (opt-in; `ray_refit.choose_transport`).
One refit, run on every trainer rank at once (`push_ipc`, from `PolicyWorker.push_ipc`):

1. every rank checks its shards and iterates the policy's weight stream (`ray_refit.checked_stream`);
   rank 0 packs it into buckets of the rollout dtype (`rollout.refit.iter_buckets`), allocated where
   a handle can share them: on the GPU (CUDA IPC) or in shared memory (CPU, `refit.shm_alloc`);
2. rank 0 broadcasts each bucket over the trainers' own group (`refit.broadcast_bucket` on a
   group of the trainer ranks made for the refit, `relay_group`: NCCL on GPU, gloo on CPU), so every
   rank holds it on its own device; the other ranks run the stream's collectives in a helper
   thread meanwhile (their stream yields nothing, rank 0's gathers need them);
3. each rank with an engine hands it the bucket's handle through Ray (`hand_over`:
   `refit.cuda_ipc_handle` / `refit.shm_handle`, a dict of str, bytes and ints; the bucket's bytes
   never cross Ray), the engine opens it and loads in place (`receive_handle`: `engine.load_bucket`;
   a vLLM engine in another process forwards the handle to its workers, `nrl_refit_bucket`) and
   answers; only then does the rank drop the buffer (the handle's memory is released);
4. the ranks agree (`all_reduce` over the relay group) that every engine loaded the bucket before
   rank 0 makes the next one; a failed load stops the stream on every rank (rank 0 drains its
   stream's collectives, sends the end marker) and every rank raises.

`refit/mode` = `cuda_ipc` (2) on GPU, `shm` (1) on CPU (`refit.MODE_CODES`). Ran: CPU shared memory
under Ray with 2 FSDP2 trainer ranks and 2 torch rollout engines (tests/integration/test_ray_refit_transports.py),
the relay and its failure path over 2 gloo ranks (tests/integration/test_ipc_relay.py);
the CUDA path has not run under Ray (docs/vllm.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nemo_rl_fp16.rollout.refit import (
    Bucket,
    broadcast_bucket,
    cuda_ipc_handle,
    iter_buckets,
    open_cuda_ipc,
    open_shm,
    shm_alloc,
    shm_handle,
)

_RELAY: dict[str, Any] = {}  # device -> the trainers' relay group (made once per process)


def _ray_get(refs: Any) -> Any:
    """`ray.get` (imported here: the transport's stand-in tests run without Ray)."""
    import ray

    return ray.get(refs)


def ipc_mode(device: str) -> tuple[str, Callable[[int, torch.device], torch.Tensor]]:
    """The handle kind and the bucket allocator for the run's device.

    Args:
        device: `cuda` or `cpu`.

    Returns:
        `("cuda_ipc", alloc on this rank's GPU)` or `("shm", refit.shm_alloc)`.
    """
    if device == "cuda":
        return "cuda_ipc", lambda n, dev: torch.empty(n, dtype=torch.uint8, device="cuda")
    return "shm", lambda n, dev: shm_alloc(n, dev)


def relay_group(device: str) -> Any:
    """The trainer ranks' own group for the bucket relay (a collective the first time, then cached).

    A group of its own so the relay's broadcasts never interleave with the weight stream's
    collectives on the default group (they run in two threads on ranks other than 0).

    Args:
        device: `cuda` (NCCL) or `cpu` (gloo).

    Returns:
        A torch.distributed group of every trainer rank.
    """
    import torch.distributed as dist

    if device not in _RELAY:
        _RELAY[device] = dist.new_group(backend="nccl" if device == "cuda" else "gloo")
    return _RELAY[device]


def hand_over(bucket: Bucket, mode: str, send: Callable[[dict, dict, str], int]) -> int:
    """Share `bucket` with its consumer by handle and wait for the answer; the caller then drops the buffer.

    The handle is made here and the buffer stays referenced by `bucket` until `send` returns:
    the consumer has loaded it by then (its answer), and only after that may the sender release
    the memory or make the next bucket.

    Args:
        bucket: a bucket whose buffer is on the GPU (`cuda_ipc`) or in shared memory (`shm`).
        mode: `cuda_ipc` or `shm`.
        send: `send(meta, handle, mode) -> bytes loaded`, blocking until the consumer answers
            (a Ray call to `RolloutWorker.refit_ipc`, or a stand-in consumer).

    Returns:
        The bytes the consumer loaded.

    Raises:
        ValueError: an unknown mode, or a buffer the mode cannot share.
    """
    if mode == "cuda_ipc":
        handle = cuda_ipc_handle(bucket.buffer)
    elif mode == "shm":
        handle = shm_handle(bucket.buffer)
    else:
        raise ValueError(f"unknown ipc handle kind {mode!r}: cuda_ipc | shm")
    return int(send(bucket.meta.to_wire(), handle, mode))


def open_handle(handle: dict, mode: str) -> torch.Tensor:
    """The consumer's in-place view of a `hand_over` handle.

    Args:
        handle: the dict `refit.cuda_ipc_handle` or `refit.shm_handle` made.
        mode: `cuda_ipc` (opened on this process's current CUDA device) or `shm`.

    Returns:
        The flat uint8 buffer over the sender's memory (no copy).

    Raises:
        ValueError: an unknown mode.
    """
    if mode == "cuda_ipc":
        return open_cuda_ipc(handle, torch.cuda.current_device())
    if mode == "shm":
        return open_shm(handle)
    raise ValueError(f"unknown ipc handle kind {mode!r}: cuda_ipc | shm")


def receive_handle(engine: Any, meta: dict, handle: dict, mode: str) -> int:
    """An engine's load of one handed-over bucket, in place; returns once the bucket's memory is no longer read.

    A vLLM engine whose worker runs in another process forwards the handle to it
    (`load_bucket_handle`); any other engine opens it here and copies it in (`engine.load_bucket`).
    On CUDA the stream is synchronised before answering, so the sender may free the memory.

    Args:
        engine: the rollout engine (after `begin_refit`).
        meta: `BucketMeta.to_wire()`.
        handle: the bucket's handle.
        mode: `cuda_ipc` or `shm`.

    Returns:
        The bytes loaded.
    """
    if hasattr(engine, "load_bucket_handle"):
        return int(engine.load_bucket_handle(meta, handle, mode))
    buf = open_handle(handle, mode)
    try:
        n = int(engine.load_bucket(meta, buf))
        if mode == "cuda_ipc":
            torch.cuda.current_stream().synchronize()
    finally:
        del buf
    return n


def _load_and_agree(bucket: Bucket, send: Callable | None, mode: str, group: Any, dev: str
                    ) -> tuple[BaseException | None, bool]:
    """Hand `bucket` to this rank's engine (if any); all ranks agree whether every engine loaded it."""
    import torch.distributed as dist

    err = None
    if send is not None:
        try:
            hand_over(bucket, mode, send)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it before anyone raises
            err = e
    bad = torch.tensor([0 if err is None else 1], dtype=torch.int64, device=dev)
    if group is not None:
        dist.all_reduce(bad, group=group)
    return err, bool(int(bad.item()))


def push_ipc(policy: Any, engine: Any, dtype: torch.dtype, bucket_bytes: int, step: int, device: str
             ) -> tuple[int, str]:
    """One `ipc` refit from this trainer rank (every rank at once; see the module docstring).

    Args:
        policy: the rank's policy engine.
        engine: the `RolloutWorker` handle of the engine on this rank's bundle, or None (none there).
        dtype: the rollout dtype the buckets are cast to.
        bucket_bytes: bucket size in bytes (`rollout.refit_bucket_mb`).
        step: the RL step (for the non-finite message).
        device: `cuda` (CUDA IPC, NCCL relay) or `cpu` (shared memory, gloo relay).

    Returns:
        `(bytes this rank's engine loaded, "cuda_ipc" | "shm")` ("restart" when the engine
        restarted to take them), `(0, mode)` on a rank without an engine.

    Raises:
        NonFiniteError: a weight is NaN/inf or beyond `dtype` (`checked_stream`); nothing was sent.
        RuntimeError: another rank's engine failed to load a bucket (this rank's own error is
            raised as it is).
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed as dist

    from nemo_rl_fp16.distributed.ray_refit import checked_stream

    stream = iter(checked_stream(policy, step, dtype, 0))
    mode, alloc = ipc_mode(device)
    me = dist.get_rank() if dist.is_initialized() else 0
    group = relay_group(device) if dist.is_initialized() and dist.get_world_size() > 1 else None
    dev = "cuda" if device == "cuda" else "cpu"
    send = None
    if engine is not None:
        _ray_get(engine.refit_begin.remote())

        def send(meta: dict, handle: dict, kind: str) -> int:
            return _ray_get(engine.refit_ipc.remote(meta, handle, kind))
    err, bad = None, False
    if me == 0:
        for bucket in iter_buckets(stream, dtype, bucket_bytes, alloc=alloc):
            if group is not None:
                broadcast_bucket(bucket, 0, group, dev)
            err, bad = _load_and_agree(bucket, send, mode, group, dev)
            del bucket  # released: every engine answered
            if bad:
                break
        if bad:  # the other ranks' stream collectives still wait for ours; nothing more is sent
            for _ in stream:
                pass
        if group is not None:
            broadcast_bucket(None, 0, group, dev)
    else:
        with ThreadPoolExecutor(1) as pool:
            drained = pool.submit(lambda: [None for _ in stream])  # the stream's collectives
            while (b := broadcast_bucket(None, 0, group, dev, alloc=alloc)) is not None:
                if not bad:
                    err, bad = _load_and_agree(b, send, mode, group, dev)
                del b  # released: this rank's engine answered
            drained.result()
    if err is not None:
        raise err
    if bad:
        raise RuntimeError(f"refit at step {step}: another trainer rank's engine failed to load a bucket "
                           f"(its error is in that rank's log); the refit stopped on every rank")
    if engine is None:
        return 0, mode
    n, how = _ray_get(engine.refit_end.remote())
    return int(n), "restart" if how == "restart" else mode


def check_pairs(engine_of_rank: list[int | None], engines: int) -> None:
    """Every engine shares exactly one trainer rank's bundle (the colocated layout's construction).

    Args:
        engine_of_rank: entry r: the index of the engine on trainer rank r's bundle, or None.
        engines: the number of rollout engines.

    Raises:
        ValueError: an engine shares no trainer rank's bundle, or more than one.
    """
    placed = sorted(j for j in engine_of_rank if j is not None)
    if placed != list(range(engines)):
        raise ValueError(f"rollout.refit_transport=ipc: every rollout engine must share one trainer rank's bundle; "
                         f"engines by trainer rank: {engine_of_rank} for {engines} engines "
                         "(use cluster.ray.layout=colocated)")


def merge_stats(stats: list[tuple[int, str]]) -> tuple[int, str]:
    """The group's `(refit/bytes, transport)` from every trainer rank's `push_ipc` answer.

    Args:
        stats: each rank's `(bytes its engine loaded, mode)`.

    Returns:
        `(bytes all engines loaded together, "restart" if any engine restarted else the handle kind)`.
    """
    modes = {m for _, m in stats}
    return sum(n for n, _ in stats), "restart" if "restart" in modes else stats[0][1]

