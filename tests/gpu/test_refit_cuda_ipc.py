"""CUDA IPC refit transport against a stand-in consumer process on one GPU (scripts/gpu_check.sh).

The sender casts a ~2 GB fp32 state dict to fp16 buckets on the GPU, sends each bucket's CUDA
IPC handle (`refit.cuda_ipc_handle`, plain bytes/ints as vLLM's msgpack path carries them) to a
spawned consumer, which opens it in place (`open_cuda_ipc`), loads it into its own fp16 tensors
and acks; the sender releases the bucket only after the ack. Checks: bitwise equality, and prints
`GPU-RESULT refit_cuda_ipc_GBps=...` (fp16 bytes moved / wall time; target >= 100 GB/s on an H200).
A second, small test (16 MiB) runs the Ray `ipc` transport's sender loop (`ray_ipc_refit.push_ipc`,
one rank, no Ray) against a stand-in engine process: bitwise, and each bucket released before the next.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _shapes(total_fp32_bytes: int, n: int = 64) -> dict[str, list[int]]:
    per = total_fp32_bytes // 4 // n
    return {f"layers.{i}.w": [per // 4096, 4096] for i in range(n)}


def _consumer(conn, shapes: dict):
    from nemo_rl_fp16.rollout.refit import BucketMeta, load_bucket_into, open_cuda_ipc

    own = {k: torch.zeros(s, dtype=torch.float16, device="cuda") for k, s in shapes.items()}
    seen: set[str] = set()
    while (msg := conn.recv()) is not None:
        buf = open_cuda_ipc(msg["handle"], 0)
        load_bucket_into(own, BucketMeta.from_wire(msg["meta"]), buf, seen)
        torch.cuda.synchronize()
        del buf
        conn.send("ack")
    conn.send({k: float(v.double().sum()) for k, v in own.items()})


def test_cuda_ipc_bucketed_refit_2gb():
    from nemo_rl_fp16.rollout.refit import iter_buckets, send_bucket

    shapes = _shapes(4 * 2**30)  # 4 GiB fp32 -> 2 GiB fp16 moved
    g = torch.Generator(device="cuda").manual_seed(0)
    src = {k: torch.randn(s, device="cuda", generator=g) for k, s in shapes.items()}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_consumer, args=(child, shapes))
    p.start()
    try:
        moved = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in iter_buckets(src.items(), torch.float16, 512 * 2**20):
            meta, handle, _ = send_bucket(b, "cuda_ipc")
            json.dumps(meta)  # plain data
            torch.cuda.synchronize()
            parent.send({"meta": meta, "handle": handle})
            assert parent.recv() == "ack"
            moved += b.meta.nbytes
            del b
        dt = time.perf_counter() - t0
        parent.send(None)
        sums = parent.recv()
    finally:
        p.join(120)
    assert p.exitcode == 0
    want = {k: float(v.half().double().sum()) for k, v in src.items()}
    assert sums == want
    print(f"GPU-RESULT refit_cuda_ipc_GBps={moved / dt / 1e9:.1f} bytes={moved} s={dt:.3f}")


def _ipc_engine_consumer(conn, shapes: dict):
    """A stand-in rollout engine process on the same GPU: `ray_ipc_refit.receive_handle` -> `load_bucket`."""
    import hashlib

    from nemo_rl_fp16.distributed.ray_ipc_refit import receive_handle
    from nemo_rl_fp16.rollout.refit import BucketMeta, load_bucket_into

    class Engine:
        def __init__(self):
            self.own = {k: torch.zeros(s, dtype=torch.float16, device="cuda") for k, s in shapes.items()}
            self.seen: set[str] = set()

        def load_bucket(self, meta: dict, buffer: torch.Tensor) -> int:
            load_bucket_into(self.own, BucketMeta.from_wire(meta), buffer, self.seen)
            return int(meta["nbytes"])

    engine = Engine()
    while (msg := conn.recv()) is not None:
        time.sleep(0.05)  # reads late: an early release by the sender would show
        conn.send(receive_handle(engine, msg["meta"], msg["handle"], msg["mode"]))
    conn.send({k: hashlib.sha256(v.cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
               for k, v in engine.own.items()})


def test_ipc_transport_sender_loop_to_a_stand_in_engine(monkeypatch):
    """`ray_ipc_refit.push_ipc` (the Ray `ipc` transport's loop, one rank, no Ray) with CUDA IPC handles:
    bitwise, and bucket k+1 is allocated only after the engine answered bucket k."""
    import hashlib

    from nemo_rl_fp16.distributed import ray_ipc_refit

    class Policy:
        def __init__(self, state):
            self.state = state

        def _fp32_named_params(self):
            return self.state

        def rollout_stream(self, dst=0):
            return iter(self.state.items())

    class Call:
        def __init__(self, fn):
            self.remote = fn

    events: list[str] = []
    mode0, alloc0 = ray_ipc_refit.ipc_mode("cuda")
    monkeypatch.setattr(ray_ipc_refit, "_ray_get", lambda x: x)
    monkeypatch.setattr(ray_ipc_refit, "ipc_mode", lambda d: (mode0, lambda n, dev: (events.append("alloc"),
                                                                                    alloc0(n, dev))[1]))
    shapes = {f"layers.{i}.w": [1024, 1024] for i in range(8)}  # 2 MiB each in fp16, 4 MiB buckets: 4 buckets
    g = torch.Generator(device="cuda").manual_seed(0)
    src = {k: torch.randn(s, device="cuda", generator=g) for k, s in shapes.items()}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_ipc_engine_consumer, args=(child, shapes))
    p.start()

    def ipc(meta, handle, mode):
        events.append("sent")
        parent.send({"meta": meta, "handle": handle, "mode": mode})
        n = parent.recv()
        events.append("answered")
        return n

    worker = type("W", (), {})()
    worker.refit_begin, worker.refit_ipc = Call(lambda: None), Call(ipc)
    worker.refit_end = Call(lambda: (sum(v.numel() * 2 for v in src.values()), "ray"))
    try:
        n, mode = ray_ipc_refit.push_ipc(Policy(src), worker, torch.float16, 4 * 2**20, 0, "cuda")
        parent.send(None)
        got = parent.recv()
    finally:
        p.join(60)
    assert p.exitcode == 0 and mode == "cuda_ipc"
    assert events == ["alloc", "sent", "answered"] * 4
    assert got == {k: hashlib.sha256(v.half().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
                   for k, v in src.items()}
