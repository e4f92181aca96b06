"""The `ipc` refit transport's sender loop (`ray_ipc_refit.push_ipc`) against a stand-in consumer process.

One trainer rank (no process group), CPU: buckets in shared memory, each handed to a consumer process
by handle (`hand_over`); the consumer opens it after a pause and loads it with the engine-side code
(`receive_handle` -> `engine.load_bucket`). The test records when each bucket is allocated and
answered: bucket k+1 is made only after the consumer answered bucket k, bucket k's memory is alive
until then (the consumer, reading late, gets the right bytes) and released right after (its handle
no longer opens). A consumer that fails stops the refit with its error. Under Ray with 2 FSDP2 ranks:
tests/integration/test_ray_refit_transports.py.
"""

import hashlib
import json
import time

import pytest
import torch
import torch.multiprocessing as mp

from nemo_rl_fp16.distributed import ray_ipc_refit
from nemo_rl_fp16.distributed.ray_ipc_refit import check_pairs, merge_stats, receive_handle
from nemo_rl_fp16.rollout.refit import BucketMeta, load_bucket_into, open_shm


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class _Engine:
    """The consumer's rollout engine: its own fp16 tensors, loaded bucket by bucket (`load_bucket_into`)."""

    def __init__(self, shapes: dict):
        self.own = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
        self.seen: set[str] = set()

    def load_bucket(self, meta: dict, buffer: torch.Tensor) -> int:
        if any(n.startswith("poison") for n in meta["names"]):
            raise ValueError("refit bucket does not match the model: poison: unknown")
        load_bucket_into(self.own, BucketMeta.from_wire(meta), buffer, self.seen)
        return int(meta["nbytes"])


def _consumer(conn, shapes: dict, pause_s: float):
    engine = _Engine(shapes)
    while True:
        msg = json.loads(conn.recv_bytes())  # plain data: meta, handle (str/int), mode
        if msg is None:
            break
        time.sleep(pause_s)  # reads late: an early release by the sender would show here
        try:
            n = receive_handle(engine, msg["meta"], msg["handle"], msg["mode"])
            conn.send_bytes(json.dumps({"n": n}).encode())
        except ValueError as e:
            conn.send_bytes(json.dumps({"error": str(e)}).encode())
    conn.send_bytes(json.dumps({k: _digest(v) for k, v in engine.own.items()}).encode())


class _Policy:
    """A policy with a weight stream (what `checked_stream` reads): fp32 tensors, one rank."""

    def __init__(self, state: dict):
        self.state = state

    def _fp32_named_params(self):
        return self.state

    def rollout_stream(self, dst: int = 0):
        return iter(self.state.items())


class _Call:
    def __init__(self, fn):
        self.remote = fn


class _StandInWorker:
    """What `push_ipc` calls on a `RolloutWorker` handle, forwarded to the consumer process over a pipe."""

    def __init__(self, conn, events: list, handles: list):
        self.conn, self.events, self.handles, self.loaded = conn, events, handles, 0

        def ipc(meta, handle, mode):
            self.handles.append(handle)
            self.events.append(("sent", len(self.handles) - 1))
            self.conn.send_bytes(json.dumps({"meta": meta, "handle": handle, "mode": mode}).encode())
            reply = json.loads(self.conn.recv_bytes())
            self.events.append(("answered", len(self.handles) - 1))
            if "error" in reply:
                raise ValueError(reply["error"])
            self.loaded += reply["n"]
            return reply["n"]

        self.refit_begin = _Call(lambda: None)
        self.refit_ipc = _Call(ipc)
        self.refit_end = _Call(lambda: (self.loaded, "ray"))


def _released(handle: dict) -> bool:
    try:
        open_shm(handle)
    except RuntimeError:
        return True
    return False


def _run(monkeypatch, state: dict, pause_s: float = 0.2):
    monkeypatch.setattr(ray_ipc_refit, "_ray_get", lambda x: x)  # the stand-in's calls answer directly (no cluster)
    events, handles = [], []
    mode0, alloc0 = ray_ipc_refit.ipc_mode("cpu")

    def alloc(n, dev):
        # every bucket handed over so far must be answered and released before a new one is made
        events.append(("alloc", len(handles), all(_released(h) for h in handles)))
        return alloc0(n, dev)

    monkeypatch.setattr(ray_ipc_refit, "ipc_mode", lambda device: (mode0, alloc))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_consumer, args=(child, {k: list(v.shape) for k, v in state.items()
                                                    if not k.startswith("poison")}, pause_s))
    p.start()
    worker = _StandInWorker(parent, events, handles)
    try:
        try:
            result = ray_ipc_refit.push_ipc(_Policy(state), worker, torch.float16, 4096, 0, "cpu")
        finally:
            parent.send_bytes(b"null")
            got = json.loads(parent.recv_bytes())
    finally:
        p.join(60)
    assert p.exitcode == 0
    return result, got, events, handles


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(32, 32, generator=g) for i in range(4)}  # 2 KiB each in fp16


def test_each_bucket_is_released_only_after_the_consumer_answered(monkeypatch):
    state = _state()
    (n, mode), got, events, handles = _run(monkeypatch, state)
    assert mode == "shm" and len(handles) == 2  # 4 x 2 KiB in 4 KiB buckets (64-byte alignment: 2 per bucket)
    assert got == {k: _digest(v.to(torch.float16)) for k, v in state.items()}  # read late, still the right bytes
    assert n == sum(v.numel() * 2 for v in state.values())
    # alloc 0, sent 0, answered 0, alloc 1 (bucket 0 released by then), sent 1, answered 1
    assert [e[:2] for e in events] == [("alloc", 0), ("sent", 0), ("answered", 0), ("alloc", 1), ("sent", 1),
                                       ("answered", 1)]
    assert all(e[2] for e in events if e[0] == "alloc")
    assert all(_released(h) for h in handles)  # nothing left in shared memory after the refit


def test_a_failed_load_stops_the_refit_with_its_error(monkeypatch):
    state = {"poison.weight": torch.ones(32, 32), **_state()}
    with pytest.raises(ValueError, match="poison: unknown"):
        _run(monkeypatch, state, pause_s=0.0)


def test_every_engine_must_share_one_trainer_bundle():
    check_pairs([0, 1], 2)
    check_pairs([1, None, 0], 2)  # a rank without an engine relays nothing to it
    with pytest.raises(ValueError, match=r"every rollout engine must share one trainer rank's bundle.*\[0, 0\]"):
        check_pairs([0, 0], 2)
    with pytest.raises(ValueError, match="layout=colocated"):
        check_pairs([0, None], 2)


def test_group_stats_sum_the_engines_and_report_a_restart():
    assert merge_stats([(10, "shm"), (10, "shm")]) == (20, "shm")
    assert merge_stats([(10, "cuda_ipc"), (0, "cuda_ipc")]) == (10, "cuda_ipc")
    assert merge_stats([(10, "cuda_ipc"), (10, "restart")]) == (10 + 10, "restart")


def test_unknown_handle_kind_is_refused():
    with pytest.raises(ValueError, match="unknown ipc handle kind 'pickle'"):
        ray_ipc_refit.open_handle({}, "pickle")
