"""The `ipc` transport's relay over the trainers' group, 2 gloo ranks, without Ray (`ray_ipc_refit.push_ipc`).

Each rank runs `push_ipc` with a stand-in policy whose weight stream is a collective yielding only on
rank 0 (one `broadcast` per tensor on the default group, like the FSDP2 stream's gathers) and a
stand-in engine in the same process (handles opened with `receive_handle`). Checks: the relay's
broadcasts and the stream's collectives do not block each other (rank 1 drains its stream in a helper
thread), both engines end bitwise equal to the fp16 weights, each rank reports its own engine's bytes;
a load that fails on rank 1 makes every rank raise (rank 1 its own error, rank 0 "another trainer
rank's engine failed") instead of hanging, and no bucket after the failing one is handed over.
"""

import hashlib
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    return {f"layers.{i}.weight": torch.randn(32, 32, generator=g) for i in range(6)}


class _Policy:
    """A stream that is a collective: rank 0 broadcasts each tensor on the default group and yields it."""

    def __init__(self, rank: int):
        self.rank, self.state = rank, _state()

    def _fp32_named_params(self):
        return self.state

    def rollout_stream(self, dst: int = 0):
        import torch.distributed as dist

        for k, v in self.state.items():
            t = v.clone() if self.rank == dst else torch.empty_like(v)
            dist.broadcast(t, dst)
            if self.rank == dst:
                yield k, t


class _Engine:
    def __init__(self, fail_at: int | None):
        self.own = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in _state().items()}
        self.seen: set[str] = set()
        self.loaded, self.calls, self.fail_at = 0, 0, fail_at

    def load_bucket(self, meta: dict, buffer: torch.Tensor) -> int:
        from nemo_rl_fp16.rollout.refit import BucketMeta, load_bucket_into

        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("refit bucket does not match the model: planted failure")
        load_bucket_into(self.own, BucketMeta.from_wire(meta), buffer, self.seen)
        self.loaded += int(meta["nbytes"])
        return int(meta["nbytes"])


class _Call:
    def __init__(self, fn):
        self.remote = fn


def _worker(rank: int, port: int, out: str, fail_at: int | None):
    import torch.distributed as dist

    from nemo_rl_fp16.distributed import ray_ipc_refit

    torch.set_num_threads(1)
    ray_ipc_refit._ray_get = lambda x: x  # the stand-in engine answers directly (no Ray)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    engine = _Engine(fail_at if rank == 1 else None)
    handle = type("Worker", (), {})()
    handle.refit_begin = _Call(lambda: None)
    handle.refit_ipc = _Call(lambda meta, h, mode: ray_ipc_refit.receive_handle(engine, meta, h, mode))
    handle.refit_end = _Call(lambda: (engine.loaded, "ray"))
    result = {}
    try:
        result["stats"] = ray_ipc_refit.push_ipc(_Policy(rank), handle, torch.float16, 4096, 0, "cpu")
    except Exception as e:  # noqa: BLE001 - recorded for the test
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    result["calls"] = engine.calls
    result["digests"] = {k: _digest(v) for k, v in engine.own.items()}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def _spawn(tmp_path, fail_at: int | None) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.spawn(_worker, args=(port, out, fail_at), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:  # a hang is the failure this test looks for
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the relay hung: a rank never returned from push_ipc")
    return [json.load(open(f"{out}.{r}")) for r in (0, 1)]


def test_both_ranks_engines_get_every_bucket(tmp_path):
    r0, r1 = _spawn(tmp_path, None)
    want = {k: _digest(v.to(torch.float16)) for k, v in _state().items()}
    nbytes = sum(v.numel() * 2 for v in _state().values())
    assert r0["digests"] == want and r1["digests"] == want  # bitwise, relayed to rank 1 through the gloo group
    assert r0["stats"] == [nbytes, "shm"] and r1["stats"] == [nbytes, "shm"]
    assert r0["calls"] == r1["calls"] == 3  # 6 x 2 KiB in 4 KiB buckets


def test_a_failed_load_on_one_rank_stops_every_rank(tmp_path):
    r0, r1 = _spawn(tmp_path, 2)  # rank 1's engine fails on the second bucket
    assert r1["error"] == "ValueError: refit bucket does not match the model: planted failure"
    assert r0["error"].startswith("RuntimeError: refit at step 0: another trainer rank's engine failed")
    assert r0["calls"] == r1["calls"] == 2  # nothing after the failing bucket was handed over
