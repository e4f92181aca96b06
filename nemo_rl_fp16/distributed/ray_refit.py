"""Refit under Ray: trainer rank 0 pushes buckets straight to the rollout engines; the driver holds no weights.

Order of one refit (`RayRolloutGroup.refit_from`, called by the loop's `RLTrainer.refit`):

1. every trainer rank frees its cached accelerator memory (`free_cache`: `gc` + `empty_cache`);
2. colocated engines wake their **weights** only (`wake_up(["weights"])`; vLLM sleep mode), the KV
   cache stays freed until the next `generate`;
3. every trainer rank runs `push_weights`: each checks its own shards for NaN/inf (or values
   beyond the rollout dtype) and the ranks agree (`all_reduce`) before anything is sent; then
   the policy's weight stream (`rollout_stream`: Megatron gathers each piece to rank 0 only,
   `policy/megatron/refit_stream.py`; the torch backend each FSDP2 parameter to rank 0 only, LoRA
   merged per weight, `policy/torch_refit_stream.py`; an engine without a stream:
   `rollout_state_dict` on rank 0) is packed on
   rank 0 into buckets of the rollout dtype (`rollout.refit.iter_buckets`, cast on the trainer's
   device) and each bucket goes to every engine through Ray's object store (one `ray.put` per
   bucket, read by all engines; the next bucket is made only after all engines loaded this one);
4. the engines finish (`end_refit`: every weight must have come).

The driver only gets `(bytes, transport)` back. Transport logged as `refit/mode` = `ray` (5).

Broadcast transport (`rollout.refit_transport`, `choose_transport`: `auto` = broadcast for split
layouts on CUDA): before the first refit the driver sets up a process group of its own
(`rollout.refit.RefitGroup`: a TCP store on rank 0's node, NCCL on GPU, gloo on CPU) between trainer
rank 0 (member 0) and the engines (`open_group`: rank 0 publishes `(addr, port)` through the driver,
the engines join with `RolloutWorker.refit_group_join`; a vLLM engine's workers join inside vLLM,
`vllm_worker.nrl_refit_group_join`). Step 3 then sends each bucket with
`rollout.refit.broadcast_bucket` (metadata as JSON bytes, then the buffer, on rank 0's device)
while every engine receives until the end marker (`RolloutWorker.refit_receive` ->
`receive_buckets`); `refit/mode` = `broadcast` (3). Nothing goes through the object store.

IPC transport (`ipc`, colocated layouts, opt-in: `choose_transport`; `ray_ipc_refit.py`): every trainer rank with an
engine on its bundle gets each bucket (rank 0 packs it, then broadcasts it over the trainers' own
group) and hands its engine a handle (CUDA IPC on GPU, shared memory on CPU); `refit/mode` =
`cuda_ipc` (2) or `shm` (1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nemo_rl_fp16.guards import NonFiniteError, nonfinite_tensors


def free_cache() -> None:
    """Return this process's cached accelerator memory before a colocated engine wakes (no-op on CPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def checked_stream(policy: Any, step: int, dtype: torch.dtype, dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's rollout weights as `(HF name, fp32 tensor)` on rank `dst`, checked first; a collective.

    `MegatronPolicy` and `TorchPolicy` stream piece by piece (`rollout_stream`) after every rank
    checked its own shards (`_fp32_named_params`; LoRA: the merged weights, one at a time); any
    other `PolicyEngine` gives its `rollout_state_dict()` (FSDP: a collective, the
    full copy on `dst` only), checked on `dst`. The ranks agree on the outcome (`all_reduce`)
    before anything is sent, so all raise together.

    Args:
        policy: the rank's policy engine.
        step: the RL step (for the message).
        dtype: the rollout dtype; values beyond its range count as inf.
        dst: the global rank that sends to the engines.

    Returns:
        An iterator every rank must exhaust; it yields only on `dst`.

    Raises:
        NonFiniteError: some rank holds a NaN/inf (or out-of-range) weight; nothing was sent.
    """
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else 0
    limit = torch.finfo(dtype).max if dtype != torch.float32 else None
    if hasattr(policy, "rollout_stream"):
        bad = nonfinite_tensors(policy._fp32_named_params(), limit)  # this rank's own shards
        stream = None
    else:
        state = policy.rollout_state_dict()
        bad = nonfinite_tensors(state, limit) if me == dst else []
        stream = iter(state.items()) if me == dst else iter(())
    count = torch.tensor([len(bad)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(count)
    if int(count.item()):
        raise NonFiniteError(f"refit refused at step {step}: {int(count.item())} weight tensor(s) are non-finite (or "
                             f"beyond {dtype} range){', e.g. ' + ', '.join(bad[:3]) if bad else ' on other ranks'}; "
                             "the policy diverged (lower policy.lr, check the data); nothing was sent")
    return policy.rollout_stream(dst) if stream is None else stream


def choose_transport(setting: str, device: str, layout: str) -> str:
    """The Ray refit's transport from `rollout.refit_transport`.

    `auto`: `broadcast` for split layouts on CUDA (one NCCL broadcast per bucket from rank 0's GPU
    to every engine's GPU, no host copy), `object_store` otherwise: on CPU one `ray.put` per bucket
    shared by all engines on a node is as cheap as a gloo broadcast, which sends the bucket to each
    engine over TCP; colocated on CUDA, `ipc` (each trainer rank hands the engine on its GPU a CUDA
    IPC handle, `ray_ipc_refit.py`) is opt-in until it has run on a GPU: its relay issues NCCL
    collectives on two communicators from two threads on ranks other than 0 (the stream's gathers
    and the bucket broadcasts), an order NCCL does not guarantee to be deadlock-free. `ipc` on CPU
    is the shared-memory analogue (gloo, tested).

    Args:
        setting: `auto` | `object_store` | `broadcast` | `ipc`.
        device: `cuda` or `cpu`.
        layout: `colocated` or `split`.

    Returns:
        `object_store`, `broadcast` or `ipc`.

    Raises:
        ValueError: an unknown setting, `broadcast` for a colocated layout on CUDA (NCCL cannot
            put trainer rank 0 and an engine that share its GPU in one group), or `ipc` for a split
            layout (an engine must share a trainer rank's bundle to open its handles).
    """
    if setting not in ("auto", "object_store", "broadcast", "ipc"):
        raise ValueError(f"rollout.refit_transport={setting!r}: use auto, object_store, broadcast or ipc")
    if setting == "broadcast" and device == "cuda" and layout == "colocated":
        raise ValueError("rollout.refit_transport=broadcast with cluster.ray.layout=colocated on cuda: NCCL cannot "
                         "join trainer rank 0 and the engine sharing its GPU; set rollout.refit_transport=auto "
                         "(object_store here), ipc, or cluster.ray.layout=split")
    if setting == "ipc" and layout != "colocated":
        raise ValueError(f"rollout.refit_transport=ipc with cluster.ray.layout={layout}: an engine opens the handles "
                         "of the trainer rank it shares a bundle with; set cluster.ray.layout=colocated or "
                         "rollout.refit_transport=auto")
    if setting == "auto":
        return "broadcast" if device == "cuda" and layout == "split" else "object_store"
    return setting


def open_group(trainers: list, engines: list, device: str) -> tuple[str, int]:
    """Set up the broadcast group: trainer rank 0 (member 0) and every engine's receivers (from the driver).

    Rank 0 publishes its address and a free port (`PolicyWorker.rendezvous`) through the driver;
    every member then joins at once (`PolicyWorker.refit_group_join`, `RolloutWorker.refit_group_join`;
    a vLLM engine's workers join inside vLLM through `nrl_refit_group_join`). Only addresses and ints
    cross Ray.

    Args:
        trainers: `PolicyWorker` handles (rank 0 first).
        engines: `RolloutWorker` handles.
        device: `cuda` (NCCL) or `cpu` (gloo).

    Returns:
        `(backend, world size)`.
    """
    import ray

    backend = "nccl" if device == "cuda" else "gloo"
    sizes = ray.get([e.refit_group_size.remote() for e in engines])
    world = 1 + sum(sizes)
    addr, port = ray.get(trainers[0].rendezvous.remote())
    firsts = [1 + sum(sizes[:i]) for i in range(len(engines))]
    ray.get([trainers[0].refit_group_join.remote(addr, port, world, backend)]
            + [e.refit_group_join.remote(addr, port, r, world, backend) for e, r in zip(engines, firsts, strict=True)])
    return backend, world


def receive_buckets(engine: Any, group: Any) -> tuple[int, str]:
    """An engine's side of a broadcast refit: receive buckets from member 0 until the end, load each.

    A vLLM engine in place receives in its workers (`engine.receive_refit_broadcast`); any other
    engine (torch, vLLM in restart mode) here, through `engine.load_bucket`.

    Args:
        engine: the rollout engine (after `begin_refit`).
        group: this process's `rollout.refit.RefitGroup` (None when the engine's workers hold it).

    Returns:
        `(bytes received, "broadcast")` ("restart" when the engine restarted to take them).
    """
    from nemo_rl_fp16.rollout.refit import broadcast_bucket

    if group is None:
        n = engine.receive_refit_broadcast()
    else:
        n = 0
        while (b := broadcast_bucket(None, 0, group, group.device)) is not None:
            n += engine.load_bucket(b.meta.to_wire(), b.buffer)
            del b
    engine.end_refit()
    return n, "restart" if getattr(engine, "last_refit_transport", None) == "restart" else "broadcast"


def push_weights(policy: Any, engines: list, dtype: torch.dtype, bucket_bytes: int, step: int,
                 group: Any = None) -> tuple[int, str]:
    """One refit from this trainer rank (run on every rank at once; rank 0 sends).

    Args:
        policy: the rank's policy engine.
        engines: `RolloutWorker` actor handles (they expose `refit_begin` / `refit_bucket` / `refit_end`,
            and `refit_receive` for the broadcast).
        dtype: the rollout dtype the buckets are cast to.
        bucket_bytes: bucket size in bytes (`rollout.refit_bucket_mb`).
        step: the RL step (for the non-finite message).
        group: on rank 0, the broadcast group (`rollout.refit.RefitGroup`, member 0) when the
            transport is `broadcast`; None: Ray's object store.

    Returns:
        `(bytes sent to all engines together, "ray" | "broadcast")` on rank 0 ("restart" when an
        engine restarted to take them), `(0, ...)` elsewhere.

    Raises:
        NonFiniteError: a weight is NaN/inf or beyond `dtype` (`checked_stream`); nothing was sent.
    """
    import ray
    import torch.distributed as dist

    from nemo_rl_fp16.rollout.refit import broadcast_bucket, iter_buckets

    stream = checked_stream(policy, step, dtype, 0)
    me = dist.get_rank() if dist.is_initialized() else 0
    if me != 0:
        for _ in stream:  # the collectives of the stream; nothing arrives here
            pass
        return 0, "ray"
    ray.get([e.refit_begin.remote() for e in engines])
    sent = 0
    if group is not None:  # one broadcast per bucket; the engines receive until the empty bucket
        receiving = [e.refit_receive.remote() for e in engines]
        for bucket in iter_buckets(stream, dtype, bucket_bytes):
            if bucket.buffer.device.type != group.device:
                bucket.buffer = bucket.buffer.to(group.device)
            broadcast_bucket(bucket, 0, group, group.device)
            del bucket
        broadcast_bucket(None, 0, group, group.device)
        ends = ray.get(receiving)
        sent = sum(n for n, _ in ends)
        return sent, "restart" if any(mode == "restart" for _, mode in ends) else "broadcast"
    for bucket in iter_buckets(stream, dtype, bucket_bytes):
        ref = ray.put((bucket.meta.to_wire(), bucket.buffer.cpu()))  # one object-store copy for all engines
        ray.get([e.refit_bucket.remote(ref) for e in engines])
        sent += bucket.meta.nbytes * len(engines)
        del bucket, ref
    ends = ray.get([e.refit_end.remote() for e in engines])
    return sent, "restart" if any(mode == "restart" for _, mode in ends) else "ray"
