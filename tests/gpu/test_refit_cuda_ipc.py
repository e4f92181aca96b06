"""CUDA IPC refit transport against a stand-in consumer process on one GPU (scripts/gpu_check.sh).

The sender casts a ~2 GB fp32 state dict to fp16 buckets on the GPU, sends each bucket's CUDA
IPC handle (`refit.cuda_ipc_handle`, plain bytes/ints as vLLM's msgpack path carries them) to a
spawned consumer, which opens it in place (`open_cuda_ipc`), loads it into its own fp16 tensors
and acks; the sender releases the bucket only after the ack. Checks: bitwise equality, and prints
`GPU-RESULT refit_cuda_ipc_GBps=...` (fp16 bytes moved / wall time; target >= 100 GB/s on an H200).
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
