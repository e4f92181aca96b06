"""The broadcast refit transport under Ray, on CPU (gloo), with torch rollout engine actors.

Split layout, 2 trainer ranks (FSDP2 over gloo) and 2 rollout engines. With
`rollout.refit_transport=broadcast` the driver sets up a gloo group of trainer rank 0 and both
engines (`ray_refit.open_group`) and rank 0 broadcasts each bucket (`rollout.refit.broadcast_bucket`);
with `object_store` each bucket goes through `ray.put`. Both start-up refits leave every engine
with the trainer's weights cast to fp16, bitwise, and with the same bytes; a second refit reuses the
group. Two RL steps give the same metrics row for row under both transports (the refit after a
trained step too); `refit/mode` is 3 (broadcast) vs 5 (ray).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16.assembly import build_run
from nemo_rl_fp16.commands.rl import run
from nemo_rl_fp16.config import load_recipe, typed

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")
QUIET = Console(quiet=True)
SPLIT = ["cluster.ray.enabled=true", "cluster.ray.layout=split", "cluster.ray.trainer_workers=2",
         "cluster.ray.rollout_workers=2", "rollout.refit_bucket_mb=0.05"]  # ~50 KiB buckets: many per refit


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


def _overrides(out: Path, ws: Path, transport: str, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"warm_start.cache_dir={ws}", "logging.progress=false", "logging.tensorboard=false",
            "trainer.save_every=0", *SPLIT, f"rollout.refit_transport={transport}", *extra]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _engine_digests(setup) -> list[dict[str, str]]:
    """Each engine's weights (its model's state dict), hashed, fetched from the actors."""
    models = ray.get([w.call.remote("__getattribute__", "model") for w in setup.rollout.workers])
    return [{k: _digest(v) for k, v in m.state_dict().items()} for m in models]


@pytest.mark.parametrize("transport", ["broadcast", "object_store"])
def test_start_up_refit_puts_the_trainer_weights_in_every_engine(tmp_path, ws_cache, transport):
    setup = build_run(typed(load_recipe("sanity_tiny", _overrides(tmp_path, ws_cache, transport))), QUIET)
    try:
        group = setup.rollout
        mode = "broadcast" if transport == "broadcast" else "ray"
        assert group.transport == transport and group.last_refit_transport == mode
        want = {k: _digest(v.to(torch.float16)) for k, v in setup.policy.rollout_state_dict().items()}
        got = _engine_digests(setup)
        assert len(got) == 2 and all(g == want for g in got)  # bitwise, every weight, both engines
        nbytes = sum(v.numel() * 2 for v in setup.policy.rollout_state_dict().values())
        assert group.last_refit_bytes >= 2 * nbytes  # both engines, bucket alignment padding included
        first = group.last_refit_bytes
        group.refit_from(setup.policy, 1)  # the group (broadcast) is set up once and reused
        assert (group.last_refit_bytes, group.last_refit_transport) == (first, mode)
        assert _engine_digests(setup) == got
    finally:
        setup.close()
    assert not ray.is_initialized()


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_broadcast_run_equals_object_store_run(tmp_path, ws_cache):
    rows = {}
    for transport in ("broadcast", "object_store"):
        out = tmp_path / transport
        run(load_recipe("sanity_tiny", _overrides(out, ws_cache, transport, "trainer.max_steps=2")), console=QUIET)
        rows[transport] = _rows(out)
    b, o = rows["broadcast"], rows["object_store"]
    assert [r["refit/mode"] for r in b] == [3.0, 3.0] and [r["refit/mode"] for r in o] == [5.0, 5.0]
    assert b[1]["train/grad_norm"] > 0  # step 2's rollouts come from trained weights
    skip = {"refit/mode"}
    for rb, ro in zip(b, o, strict=True):
        same = {k for k in rb if k in ro and k not in skip and not k.startswith(("time/", "perf/", "throughput/"))}
        assert {"reward/mean", "loss/value", "mismatch/kl_k3", "refit/bytes"} <= same
        assert {k: rb[k] for k in same} == {k: ro[k] for k in same}
