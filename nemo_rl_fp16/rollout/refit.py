"""Bucketed, streamed weight refit (trainer -> rollout engine) with bounded memory, and its transports.

A refit is a stream of **buckets**: flat `uint8` buffers of at most `bucket_bytes` (the recipe's
`rollout.refit_bucket_mb`), each holding several weights already cast to the rollout dtype, with
the metadata (HF names, shapes, byte offsets, dtype) to view them back. `iter_buckets` fills one
buffer at a time straight from the source tensors (`buffer.view(dtype).copy_(fp32)`: the cast
is the copy, on the source's device), so at any time the sender holds one bucket, never the whole
model in the rollout dtype and never a `bytes` copy. One weight larger than the bucket size goes
alone in a bucket of its own size (a loader needs whole tensors).

Transports (`mode` is what `refit/mode` logs; `MODE_CODES` gives a metric-friendly number):

- `direct`: the consumer is in the same process (torch rollout engine, in-process vLLM): the
  bucket's views are handed over as they are.
- `shm`: a separate CPU process (a multiprocess vLLM worker, a stand-in consumer): the bucket is
  allocated in shared memory (`UntypedStorage._share_filename_cpu_`, torch's own `file_system`
  tensor sharing) and only the handle crosses, as `(manager, name, size)` strings and ints — no
  pickled objects, no tensor bytes through an RPC.
- `cuda_ipc`: colocated on one GPU: the bucket lives on the GPU and its CUDA IPC handle (torch's
  `reduce_tensor` for CUDA storage) crosses as bytes and ints; the consumer opens it in place.
- `broadcast`: split layouts: a torch.distributed group (NCCL on GPU, gloo on CPU) between the
  sending trainer rank and the engines' workers; metadata as a length-prefixed JSON byte tensor,
  then the bucket buffer.

Every handle is "msgpack-safe" (str, int, bytes, lists, dicts): it goes through vLLM's safe
serializer by worker-extension method name (`vllm_worker.py`), never `VLLM_ALLOW_INSECURE_SERIALIZATION`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from nemo_rl_fp16.precision import dtype_name, get_dtype

#: `refit/mode` as a number for metric backends that take only floats (docs/metrics.md)
MODE_CODES = {"direct": 0.0, "shm": 1.0, "cuda_ipc": 2.0, "broadcast": 3.0, "restart": 4.0, "ray": 5.0}
_ALIGN = 64  # byte alignment of each tensor in a bucket (any dtype's view is aligned)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class BucketMeta:
    """What a bucket holds: HF names, shapes and byte offsets into the flat buffer, one dtype."""

    dtype: str
    names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    nbytes: int = 0

    def to_wire(self) -> dict:
        """The metadata as plain data for an RPC.

        Returns:
            A msgpack/JSON-safe dict (str, int, lists) with every field.
        """
        return {"dtype": self.dtype, "names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "offsets": list(self.offsets), "nbytes": int(self.nbytes)}

    @classmethod
    def from_wire(cls, d: dict) -> BucketMeta:
        """Inverse of `to_wire`.

        Args:
            d: a dict `to_wire` made (possibly after a msgpack/JSON round trip).

        Returns:
            The metadata, every field re-typed.
        """
        return cls(dtype=str(d["dtype"]), names=[str(n) for n in d["names"]],
                   shapes=[[int(x) for x in s] for s in d["shapes"]], offsets=[int(o) for o in d["offsets"]],
                   nbytes=int(d["nbytes"]))


@dataclass
class Bucket:
    """A flat `uint8` buffer (`nbytes` long, any device) and the `BucketMeta` to read it."""

    meta: BucketMeta
    buffer: torch.Tensor

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The bucket's weights, zero-copy.

        Yields:
            `(HF name, view into the buffer in the bucket's dtype and the weight's shape)`.
        """
        yield from views(self.meta, self.buffer)


def views(meta: BucketMeta, buffer: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` views of `buffer` as `meta` describes them (zero-copy).

    Args:
        meta: names, shapes, byte offsets and dtype of the bucket.
        buffer: the flat uint8 buffer (`meta.nbytes` long, any device).

    Yields:
        `(HF name, view)` in `meta`'s order and dtype.
    """
    dt = get_dtype(meta.dtype)
    size = torch.empty((), dtype=dt).element_size()
    for name, shape, off in zip(meta.names, meta.shapes, meta.offsets, strict=True):
        n = 1
        for s in shape:
            n *= int(s)
        yield name, buffer[off:off + n * size].view(dt).view(shape)


def tensor_nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes `t` takes once cast to `dtype`.

    Args:
        t: any tensor (only its element count is read).
        dtype: the target dtype.

    Returns:
        `t.numel() * dtype's element size`.
    """
    return t.numel() * torch.empty((), dtype=dtype).element_size()


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | str, bucket_bytes: int, *,
                 alloc: Callable[[int, torch.device], torch.Tensor] | None = None) -> Iterator[Bucket]:
    """Pack `(name, tensor)` pairs into buckets of at most `bucket_bytes`, cast to `dtype`.

    Args:
        named: the weights in load order (HF names; any dtype/device; consumed lazily, so a
            streamed source such as a per-layer gather is never materialised whole).
        dtype: the rollout dtype every tensor is cast to (e.g. torch.float16).
        bucket_bytes: the bucket size in bytes (> 0). A tensor larger than it travels alone.
        alloc: `alloc(nbytes, device) -> flat uint8 tensor` (default `torch.empty`); the shared-memory
            transport allocates in shared memory here, so no second copy is made to share it.

    Yields:
        `Bucket`s in order; the caller must be done with a bucket before asking for the next one
        if it wants the bound (the generator drops its reference when it moves on).

    Raises:
        ValueError: `bucket_bytes <= 0`, or a non-floating tensor (refit carries weights only).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
    dt = get_dtype(dtype) if isinstance(dtype, str) else dtype
    alloc = alloc or (lambda n, dev: torch.empty(n, dtype=torch.uint8, device=dev))
    buf: torch.Tensor | None = None
    meta = BucketMeta(dtype=dtype_name(dt))
    used = 0

    def flush() -> Bucket:
        return Bucket(meta, buf[:used] if used < buf.numel() else buf)

    for name, t in named:
        if not t.is_floating_point():
            raise ValueError(f"refit carries floating weights only; {name} is {dtype_name(t.dtype)}")
        need = tensor_nbytes(t, dt)
        if buf is not None and (_align(used) + need > buf.numel() or buf.device != t.device):
            yield flush()
            buf, meta, used = None, BucketMeta(dtype=dtype_name(dt)), 0
        if buf is None:
            buf = alloc(max(bucket_bytes, need), t.device)
        off = _align(used)
        buf[off:off + need].view(dt).view(t.shape).copy_(t.detach())  # the cast is the copy
        meta.names.append(name)
        meta.shapes.append(list(t.shape))
        meta.offsets.append(off)
        used = off + need
        meta.nbytes = used
    if buf is not None and meta.names:
        yield flush()


# ------------------------------------------------------------------------------- shared memory (CPU)
def shm_alloc(nbytes: int, device: torch.device | None = None) -> torch.Tensor:
    """A flat uint8 CPU tensor in shared memory (torch's `file_system` strategy).

    Args:
        nbytes: its length in bytes.
        device: the device the caller's weights are on (only CPU is accepted).

    Returns:
        The uninitialised shared-memory tensor, `[nbytes]` uint8.

    Raises:
        ValueError: `device` is not the CPU.
    """
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"the shared-memory transport carries CPU buckets, got a {device} tensor: "
                         "use the cuda_ipc transport for GPU weights")
    storage = torch.UntypedStorage._new_using_filename_cpu(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


def shm_handle(buffer: torch.Tensor) -> dict:
    """Msgpack-safe handle of a shared-memory bucket buffer.

    Args:
        buffer: a flat uint8 CPU tensor allocated by `shm_alloc` (or a slice of one).

    Returns:
        `{manager, name, size, offset, nbytes}` (str and int only).

    Raises:
        ValueError: `buffer` is not on the CPU or not in shared memory.
    """
    if buffer.device.type != "cpu":
        raise ValueError("shm_handle needs a CPU tensor")
    storage = buffer.untyped_storage()
    if not storage.is_shared():
        raise ValueError("bucket buffer is not in shared memory (allocate it with shm_alloc)")
    manager, name, size = storage._share_filename_cpu_()
    return {"manager": manager.decode() if isinstance(manager, bytes) else manager,
            "name": name.decode() if isinstance(name, bytes) else name, "size": int(size),
            "offset": int(buffer.storage_offset()), "nbytes": int(buffer.numel())}


def open_shm(handle: dict) -> torch.Tensor:
    """The consumer's view (no copy) of a buffer shared with `shm_handle`.

    Args:
        handle: the dict `shm_handle` made.

    Returns:
        The flat uint8 view of the sender's pages, `[nbytes]`.
    """
    storage = torch.UntypedStorage._new_shared_filename_cpu(
        handle["manager"].encode(), handle["name"].encode(), int(handle["size"]))
    t = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (int(handle["size"]),), (1,))
    return t[int(handle["offset"]):int(handle["offset"]) + int(handle["nbytes"])]


# ------------------------------------------------------------------------------- CUDA IPC (colocated)
def cuda_ipc_handle(buffer: torch.Tensor) -> dict:
    """Msgpack-safe CUDA IPC handle of a flat uint8 CUDA bucket (torch's `reduce_tensor`).

    The sender must keep `buffer` alive until the consumer has loaded it (the RPC returned).

    Args:
        buffer: the flat uint8 CUDA bucket buffer.

    Returns:
        A dict of bytes, ints and int lists (`open_cuda_ipc` reads it).

    Raises:
        ValueError: `buffer` is not a CUDA tensor.
    """
    if buffer.device.type != "cuda":
        raise ValueError(f"cuda_ipc needs a CUDA bucket, got {buffer.device}: use the shm transport on CPU")
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    # (cls, size, stride, offset, storage_cls, dtype, device, handle, storage_size, storage_offset,
    #  requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required)
    (_, size, stride, offset, _, _, device, handle, ssize, soff, _, rc_handle, rc_off, ev, ev_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": int(offset), "device": int(device),
            "handle": bytes(handle), "storage_size": int(ssize), "storage_offset": int(soff),
            "ref_counter_handle": bytes(rc_handle), "ref_counter_offset": int(rc_off),
            "event_handle": bytes(ev) if ev is not None else None, "event_sync_required": bool(ev_sync)}


def open_cuda_ipc(h: dict, device: int | None = None) -> torch.Tensor:
    """The consumer's in-place view of a `cuda_ipc_handle` (the same GPU memory).

    Args:
        h: the dict `cuda_ipc_handle` made.
        device: this process's CUDA device index (default: the sender's).

    Returns:
        The flat uint8 CUDA tensor over the sender's memory.
    """
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dev = int(h["device"]) if device is None else int(device)
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(h["size"]), tuple(h["stride"]), int(h["offset"]),
                               torch.storage.UntypedStorage, torch.uint8, dev, h["handle"], int(h["storage_size"]),
                               int(h["storage_offset"]), False, h["ref_counter_handle"], int(h["ref_counter_offset"]),
                               h["event_handle"], bool(h["event_sync_required"]))


# ------------------------------------------------------------------------------- broadcast (split layouts)
class RefitGroup:
    """A process group of its own between the sending trainer rank (rank 0) and the engines' receivers.

    Built from a TCP store at the sender's `(addr, port)` and a backend object
    (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPU) without touching the default
    process group, so trainer rank 0 keeps its trainers' group and an engine process (a Ray
    actor, a vLLM worker) needs none. Every member constructs it at once (a rendezvous).
    """

    def __init__(self, addr: str, port: int, rank: int, world: int, backend: str, timeout_s: float = 600.0):
        """Join (rank 0: host) the group.

        Args:
            addr: the sender's address (its node IP).
            port: a free port on the sender's node (rank 0 listens on it).
            rank: this member's rank (0 = the sender).
            world: members in all (1 + the engines' receivers).
            backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors, this process's current device).
            timeout_s: rendezvous and collective timeout in seconds.

        Raises:
            ValueError: an unknown backend or a rank outside `[0, world)`.
        """
        from datetime import timedelta

        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"refit group backend must be gloo or nccl, got {backend!r}")
        if not 0 <= rank < world:
            raise ValueError(f"refit group rank {rank} outside [0, {world})")
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(addr, int(port), world, rank == 0, timeout, wait_for_workers=False)
        self.store = dist.PrefixStore("nrl_refit/", store)
        self.pg = (dist.ProcessGroupGloo(self.store, rank, world, timeout) if backend == "gloo"
                   else dist.ProcessGroupNCCL(self.store, rank, world))
        self.rank, self.world, self.backend = rank, world, backend
        #: where receive buffers live for this backend
        self.device = "cpu" if backend == "gloo" else "cuda"

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        """Broadcast `t` in place from member `src` (a collective of the group).

        Args:
            t: a contiguous tensor on `self.device`, the same shape and dtype on every member.
            src: the sending member's rank.
        """
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = int(src), 0
        self.pg.broadcast([t], opts).wait()


def broadcast_bucket(bucket: Bucket | None, src: int, group=None, device: torch.device | str = "cpu", *,
                     alloc: Callable[[int, torch.device], torch.Tensor] | None = None) -> Bucket | None:
    """Collective: `src` sends `bucket` (None: end of stream), every other rank gets it back.

    Metadata goes as a length-prefixed JSON byte tensor (no pickle), then the flat buffer.
    Every rank of `group` must call it the same number of times.

    Args:
        bucket: the bucket on `src` (None there: end of stream); ignored on the other ranks.
        src: the sending rank (global rank for a torch.distributed group; member rank for a `RefitGroup`).
        group: a `RefitGroup`, or a torch.distributed group (None: the default group).
        device: where the receive buffers live ("cuda" for NCCL, "cpu" for gloo).
        alloc: `alloc(nbytes, device) -> flat uint8 tensor` for a receive buffer (default
            `torch.empty`; `shm_alloc` when the receiver shares it on with a handle).

    Returns:
        The bucket (the sender's own on `src`), or None at end of stream.
    """
    import torch.distributed as dist

    if isinstance(group, RefitGroup):
        me, bcast = group.rank, group.broadcast
    else:
        me = dist.get_rank()

        def bcast(t: torch.Tensor, root: int) -> None:
            dist.broadcast(t, root, group=group)
    length = torch.zeros(1, dtype=torch.int64, device=device)
    if me == src:
        blob = b"" if bucket is None else json.dumps(bucket.meta.to_wire()).encode()
        length[0] = len(blob)
    bcast(length, src)
    if int(length.item()) == 0:
        return None
    if me == src:
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    else:
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    bcast(data, src)
    meta = bucket.meta if me == src else BucketMeta.from_wire(json.loads(bytes(data.cpu().numpy())))
    if me == src:
        buf = bucket.buffer.contiguous()
    elif alloc is not None:
        buf = alloc(meta.nbytes, torch.device(device))
    else:
        buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=device)
    bcast(buf, src)
    return Bucket(meta, buf)


# ------------------------------------------------------------------------------- choosing and sending
def refit_transport(in_process: bool, device_type: str) -> tuple[str, Callable[[int, torch.device], torch.Tensor] | None]:
    """The transport and bucket allocator for a vLLM engine's refit.

    `direct` when its worker runs in this process, else `cuda_ipc` on GPU and `shm` on CPU
    (split layouts use `broadcast_bucket` from the trainer).

    Args:
        in_process: the engine's worker runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).
        device_type: "cuda" or "cpu" (vLLM's platform).

    Returns:
        `(mode, alloc)`: alloc is None for `direct` (plain `torch.empty`).
    """
    if in_process:
        return "direct", None
    if device_type == "cuda":
        return "cuda_ipc", lambda n, dev: torch.empty(n, dtype=torch.uint8, device="cuda")
    return "shm", lambda n, dev: shm_alloc(n, dev)


def send_bucket(bucket: Bucket, mode: str) -> tuple[dict, object, str]:
    """The `(meta, payload, mode)` arguments of the worker's `nrl_refit_bucket` for one bucket.

    Args:
        bucket: the bucket to send.
        mode: "direct" | "shm" | "cuda_ipc".

    Returns:
        `(meta dict, the buffer or its handle, mode)`, msgpack-safe except a direct buffer.

    Raises:
        ValueError: an unknown mode, or a buffer the mode cannot carry.
    """
    if mode == "direct":
        return bucket.meta.to_wire(), bucket.buffer, mode
    if mode == "shm":
        return bucket.meta.to_wire(), shm_handle(bucket.buffer), mode
    if mode == "cuda_ipc":
        return bucket.meta.to_wire(), cuda_ipc_handle(bucket.buffer), mode
    raise ValueError(f"unknown refit transport {mode!r}: direct | shm | cuda_ipc")


def load_bucket_into(own: dict[str, torch.Tensor], bucket_meta: BucketMeta, buffer: torch.Tensor,
                     seen: set[str]) -> None:
    """A consumer's load of one bucket into `own` (name -> the model's tensor), cast by `copy_`.

    Names and shapes of the bucket are checked before anything of it is copied; `seen` collects
    the names loaded so far (the caller checks completeness at the end of the stream).

    Args:
        own: the consumer's tensors by HF name (written in place, in their own dtype).
        bucket_meta: the bucket's metadata.
        buffer: the bucket's flat uint8 buffer.
        seen: names loaded so far in this refit (updated).

    Raises:
        ValueError: an unknown name, a shape mismatch, or a name sent twice in one refit.
    """
    pairs = list(views(bucket_meta, buffer))
    bad = [f"{k}: unknown" for k, _ in pairs if k not in own]
    bad += [f"{k}: got {tuple(v.shape)}, model has {tuple(own[k].shape)}" for k, v in pairs
            if k in own and v.shape != own[k].shape]
    bad += [f"{k}: sent twice" for k, _ in pairs if k in seen]
    if bad:
        raise ValueError("refit bucket does not match the model: " + "; ".join(bad[:10]))
    with torch.no_grad():
        for k, v in pairs:
            own[k].copy_(v)
            seen.add(k)


def refit_metrics(engine, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """`refit/bytes` and `refit/mode` of the refit `engine` just did (docs/metrics.md).

    Engines that stream report `last_refit_bytes` / `last_refit_transport`; one that copies a
    state dict in place (the torch rollout engine) moved the state in its dtype, directly.

    Args:
        engine: the rollout engine (or `RayRolloutGroup`) just refitted.
        state: the state dict it was refitted from (None when the weights were streamed).

    Returns:
        `{"refit/bytes": bytes in the rollout dtype, "refit/mode": MODE_CODES[transport]}`.
    """
    mode = getattr(engine, "last_refit_transport", None) or "direct"
    nbytes = getattr(engine, "last_refit_bytes", None)
    if nbytes is None:
        dt = engine.precision.param_dtype
        nbytes = sum(tensor_nbytes(v, dt) for v in state.values())
    return {"refit/bytes": float(nbytes), "refit/mode": MODE_CODES[mode]}
