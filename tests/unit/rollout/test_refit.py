"""Bucketed, streamed refit (`rollout/refit.py`): buckets, bitwise equality with the one-shot refit,
and the transports against stand-in consumer processes on CPU (shared memory, gloo broadcast)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from nemo_rl_fp16.data import build_char_tokenizer
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.rollout.refit import (
    BucketMeta,
    broadcast_bucket,
    iter_buckets,
    load_bucket_into,
    open_shm,
    send_bucket,
    shm_alloc,
    shm_handle,
)
from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine

TINY = dict(model_type="qwen2", vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _state(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 48, generator=g) * 3, "a.bias": torch.randn(48, generator=g),
            "b.weight": torch.randn(300, 7, generator=g) * 1e-3, "c": torch.randn(5, generator=g) * 7e4}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("bucket_bytes", [1, 500, 4096, 10**9])
def test_buckets_bound_and_cast_bitwise(bucket_bytes):
    sd = _state()
    got, sizes = {}, []
    for b in iter_buckets(sd.items(), torch.float16, bucket_bytes):
        sizes.append((b.meta.nbytes, [n for n in b.meta.names]))
        assert b.buffer.dtype == torch.uint8 and b.buffer.numel() == b.meta.nbytes
        got.update(dict(b.tensors()))
    assert list(got) == list(sd)  # order kept
    for k, v in sd.items():
        assert got[k].dtype == torch.float16 and torch.equal(got[k], v.to(torch.float16))  # same rounding as .to()
    for nbytes, names in sizes:  # a bucket is within the bound unless one tensor alone exceeds it
        assert nbytes <= bucket_bytes or len(names) == 1
    if bucket_bytes == 10**9:
        assert len(sizes) == 1


def test_source_is_consumed_lazily():
    """A streamed source (per-layer gather) is pulled one bucket at a time, never all first."""
    pulled = []

    def source():
        for i in range(10):
            pulled.append(i)
            yield f"w{i}", torch.ones(256)  # 512 B in fp16
    it = iter_buckets(source(), torch.float16, 1024)
    first = next(it)
    assert first.meta.names == ["w0", "w1"] and len(pulled) <= 3
    assert sum(1 for _ in it) == 4


def test_bucket_refuses_integer_tensors_and_bad_size():
    with pytest.raises(ValueError, match="floating weights only"):
        list(iter_buckets([("ids", torch.arange(4))], torch.float16, 100))
    with pytest.raises(ValueError, match="> 0 bytes"):
        list(iter_buckets([("w", torch.ones(4))], torch.float16, 0))


def _engine():
    tok = build_char_tokenizer()
    return TorchRolloutEngine({"config": TINY}, PrecisionPolicy.from_name("fp16"), pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize("bucket_bytes", [1, 3000, 2**30])
def test_bucketed_refit_equals_one_shot_bitwise(bucket_bytes):
    src = _engine()
    g = torch.Generator().manual_seed(3)
    sd = {k: v.float() + 0.01 * torch.randn(v.shape, generator=g) for k, v in src.model.state_dict().items()}
    one, streamed = _engine(), _engine()
    one.update_weights(sd)
    sent = streamed.load_stream(sd.items(), bucket_bytes=bucket_bytes)
    a, b = one.model.state_dict(), streamed.model.state_dict()
    assert sent >= sum(v.numel() * 2 for v in sd.values())
    assert all(_digest(a[k]) == _digest(b[k]) for k in a)
    assert any(not torch.equal(a[k], src.model.state_dict()[k]) for k in a)  # the refit did change weights


def test_stream_refuses_unknown_and_incomplete():
    e = _engine()
    sd = {k: v.float() for k, v in e.model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown"):
        e.load_stream([*sd.items(), ("nope.weight", torch.ones(2))])
    with pytest.raises(ValueError, match="missed 1 weight"):
        e.load_stream(list(sd.items())[1:])


def test_cuda_ipc_needs_a_cuda_bucket():
    b = next(iter_buckets([("w", torch.ones(4))], torch.float16, 100))
    with pytest.raises(ValueError, match="cuda_ipc needs a CUDA bucket"):
        send_bucket(b, "cuda_ipc")
    with pytest.raises(ValueError, match="unknown refit transport"):
        send_bucket(b, "pickle")
    with pytest.raises(ValueError, match="not in shared memory"):
        send_bucket(b, "shm")


def _msgpack_safe(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _msgpack_safe(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_msgpack_safe(v) for v in x)
    return x is None or isinstance(x, (str, int, float, bool, bytes))


# ------------------------------------------------------------------ stand-in consumer processes
def _shm_consumer(conn, shapes: dict):
    own = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    seen: set[str] = set()
    while True:
        msg = json.loads(conn.recv_bytes())  # plain data only: what vLLM's msgpack path would carry
        if msg is None:
            break
        buf = open_shm(msg["handle"])
        load_bucket_into(own, BucketMeta.from_wire(msg["meta"]), buf, seen)
        del buf
        conn.send_bytes(b"ack")
    conn.send_bytes(json.dumps({k: _digest(v) for k, v in own.items()}).encode())


def test_shm_transport_to_a_consumer_process():
    sd = _state()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_shm_consumer, args=(child, {k: list(v.shape) for k, v in sd.items()}))
    p.start()
    try:
        n = 0
        for b in iter_buckets(sd.items(), torch.float16, 2048, alloc=lambda nb, dev: shm_alloc(nb, dev)):
            meta, handle, mode = send_bucket(b, "shm")
            assert mode == "shm" and _msgpack_safe(meta) and _msgpack_safe(handle)
            parent.send_bytes(json.dumps({"meta": meta, "handle": handle}).encode())
            assert parent.recv_bytes() == b"ack"  # released only after the consumer loaded it
            n += 1
        parent.send_bytes(b"null")
        got = json.loads(parent.recv_bytes())
    finally:
        p.join(60)
    assert n > 1 and p.exitcode == 0
    assert got == {k: _digest(v.to(torch.float16)) for k, v in sd.items()}


def test_shm_handle_opens_the_same_memory():
    buf = shm_alloc(100)
    buf.zero_()
    view = open_shm(shm_handle(buf[10:20]))
    buf[10:20] = 9
    assert view.tolist() == [9] * 10  # no copy: the consumer sees the sender's pages


def _bcast_worker(rank: int, port: int, out: str, shapes: dict):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 0:
            for b in iter_buckets(_state().items(), torch.float16, 1500):
                broadcast_bucket(b, src=0)
            broadcast_bucket(None, src=0)
        else:
            own = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
            seen: set[str] = set()
            n = 0
            while (b := broadcast_bucket(None, src=0)) is not None:
                load_bucket_into(own, b.meta, b.buffer, seen)
                n += 1
            with open(out, "w") as f:
                json.dump({"n": n, "digests": {k: _digest(v) for k, v in own.items()}}, f)
    finally:
        dist.destroy_process_group()


def test_gloo_broadcast_to_a_consumer_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sd = _state()
    out = str(tmp_path / "consumer.json")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_bcast_worker, args=(port, out, {k: list(v.shape) for k, v in sd.items()}), nprocs=2, join=True)
    got = json.load(open(out))
    assert got["n"] > 1
    assert got["digests"] == {k: _digest(v.to(torch.float16)) for k, v in sd.items()}


def _group_worker(rank: int, port: int, trainer_port: int, out: str, shapes: dict):
    """Member 0 is a "trainer rank" with a default process group of its own; member 1 a consumer."""
    import torch.distributed as dist

    from nemo_rl_fp16.rollout.refit import RefitGroup

    if rank == 0:  # its trainers' group stays the default one; the refit group is separate
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{trainer_port}", rank=0, world_size=1)
    try:
        g = RefitGroup("127.0.0.1", port, rank, 2, "gloo", timeout_s=60)
        assert (g.rank, g.world, g.device) == (rank, 2, "cpu")
        if rank == 0:
            for b in iter_buckets(_state().items(), torch.float16, 1500):
                broadcast_bucket(b, 0, g)
            broadcast_bucket(None, 0, g)
            assert dist.get_world_size() == 1  # the default group is untouched
        else:
            own = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
            seen: set[str] = set()
            n = 0
            while (b := broadcast_bucket(None, 0, g, g.device)) is not None:
                load_bucket_into(own, b.meta, b.buffer, seen)
                n += 1
            with open(f"{out}.{rank}", "w") as f:
                json.dump({"n": n, "digests": {k: _digest(v) for k, v in own.items()}}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_refit_group_beside_the_default_group_broadcasts_to_a_consumer(tmp_path):
    """`RefitGroup`: a gloo group of its own (TCP store on member 0), no default process group needed
    on the consumer, none disturbed on the sender: the consumer gets every weight bitwise (two
    engines at once: `tests/integration/test_ray_refit_transports.py`)."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    sd = _state()
    out = str(tmp_path / "consumer")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_group_worker, args=(*ports, out, {k: list(v.shape) for k, v in sd.items()}), nprocs=2, join=True)
    got = json.load(open(f"{out}.1"))
    assert got["n"] > 1 and got["digests"] == {k: _digest(v.to(torch.float16)) for k, v in sd.items()}


def test_refit_group_refuses_a_bad_backend_or_rank():
    from nemo_rl_fp16.rollout.refit import RefitGroup

    with pytest.raises(ValueError, match="gloo or nccl, got 'mpi'"):
        RefitGroup("127.0.0.1", 1, 0, 2, "mpi")
    with pytest.raises(ValueError, match=r"rank 2 outside \[0, 2\)"):
        RefitGroup("127.0.0.1", 1, 2, 2, "gloo")
