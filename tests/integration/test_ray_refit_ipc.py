"""The `ipc` refit transport under Ray, on CPU (shared memory, gloo relay), with torch rollout engine actors.

Colocated layout, 2 trainer ranks (FSDP2 over gloo) and 2 rollout engines, engine j on trainer rank j's
bundle. With `rollout.refit_transport=ipc` trainer rank 0 packs each bucket into shared memory and
broadcasts it over the trainers' own group; each rank hands the engine on its bundle a shared-memory
handle (`ray_ipc_refit.push_ipc`), the engine loads in place and answers before the bucket is released.
The start-up refit leaves every engine with the trainer's weights cast to fp16, bitwise, equal to the
`object_store` refit's, with the same bytes; a second refit reuses the relay group. Two RL steps give the
same metrics row for row under both transports; `refit/mode` is 1 (shm) vs 5 (ray).
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
COLOCATED = ["cluster.ray.enabled=true", "cluster.ray.layout=colocated", "cluster.ray.trainer_workers=2",
             "cluster.ray.rollout_workers=2", "rollout.refit_bucket_mb=0.05"]  # ~50 KiB buckets: many per refit


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


def _overrides(out: Path, ws: Path, transport: str, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"warm_start.cache_dir={ws}", "logging.progress=false", "logging.tensorboard=false",
            "trainer.save_every=0", *COLOCATED, f"rollout.refit_transport={transport}", *extra]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _engine_digests(setup) -> list[dict[str, str]]:
    """Each engine's weights (its model's state dict), hashed, fetched from the actors."""
    models = ray.get([w.call.remote("__getattribute__", "model") for w in setup.rollout.workers])
    return [{k: _digest(v) for k, v in m.state_dict().items()} for m in models]


def test_ipc_refit_equals_the_object_store_refit_bitwise(tmp_path, ws_cache):
    seen = {}
    for transport, mode in (("ipc", "shm"), ("object_store", "ray")):
        setup = build_run(typed(load_recipe("sanity_tiny", _overrides(tmp_path / transport, ws_cache, transport))),
                          QUIET)
        try:
            group = setup.rollout
            assert group.transport == transport and group.last_refit_transport == mode
            assert sorted(group.engine_of_rank) == [0, 1]  # each engine on one trainer rank's bundle
            want = {k: _digest(v.to(torch.float16)) for k, v in setup.policy.rollout_state_dict().items()}
            got = _engine_digests(setup)
            assert len(got) == 2 and all(g == want for g in got)  # bitwise, every weight, both engines
            first = group.last_refit_bytes
            group.refit_from(setup.policy, 1)  # the relay group is made once and reused
            assert (group.last_refit_bytes, group.last_refit_transport) == (first, mode)
            assert _engine_digests(setup) == got
            seen[transport] = (got, first)
        finally:
            setup.close()
        assert not ray.is_initialized()
    assert seen["ipc"] == seen["object_store"]  # the same weights and the same bytes in both engines


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ipc_run_equals_object_store_run(tmp_path, ws_cache):
    rows = {}
    for transport in ("ipc", "object_store"):
        out = tmp_path / transport
        run(load_recipe("sanity_tiny", _overrides(out, ws_cache, transport, "trainer.max_steps=2")), console=QUIET)
        rows[transport] = _rows(out)
    i, o = rows["ipc"], rows["object_store"]
    assert [r["refit/mode"] for r in i] == [1.0, 1.0] and [r["refit/mode"] for r in o] == [5.0, 5.0]
    assert i[1]["train/grad_norm"] > 0  # step 2's rollouts come from trained weights
    skip = {"refit/mode"}
    for ri, ro in zip(i, o, strict=True):
        same = {k for k in ri if k in ro and k not in skip and not k.startswith(("time/", "perf/", "throughput/"))}
        assert {"reward/mean", "loss/value", "mismatch/kl_k3", "refit/bytes"} <= same
        assert {k: ri[k] for k in same} == {k: ro[k] for k in same}
