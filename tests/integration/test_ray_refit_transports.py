"""The Ray refit transports against the object store, on CPU (gloo), with torch rollout engine actors.

2 trainer ranks (FSDP2 over gloo) and 2 rollout engines, ~50 KiB buckets (many per refit):

- `broadcast`, split layout: the driver sets up a gloo group of trainer rank 0 and both engines
  (`ray_refit.open_group`) and rank 0 broadcasts each bucket (`rollout.refit.broadcast_bucket`);
  `refit/mode` 3.
- `ipc`, colocated layout (engine j on trainer rank j's bundle): rank 0 packs each bucket into shared
  memory and relays it over the trainers' own group; each rank hands the engine on its bundle a
  shared-memory handle (`ray_ipc_refit.push_ipc`), the engine loads in place and answers before the
  bucket is released; `refit/mode` 1 (shm).

Each is compared with `object_store` (`ray.put` per bucket, `refit/mode` 5) in the same layout: the
start-up refit leaves every engine with the trainer's weights cast to fp16, bitwise, with the same
bytes; a second refit reuses the group; two RL steps give the same metrics row for row.
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
#: (layout, transport, its refit/mode name, its refit/mode code)
CASES = [("split", "broadcast", "broadcast", 3.0), ("colocated", "ipc", "shm", 1.0)]
STORE = ("object_store", "ray", 5.0)


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


def _overrides(out: Path, ws: Path, layout: str, transport: str, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"warm_start.cache_dir={ws}", "logging.progress=false", "logging.tensorboard=false",
            "trainer.save_every=0", "cluster.ray.enabled=true", f"cluster.ray.layout={layout}",
            "cluster.ray.trainer_workers=2", "cluster.ray.rollout_workers=2", "rollout.refit_bucket_mb=0.05",
            f"rollout.refit_transport={transport}", *extra]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _engine_digests(setup) -> list[dict[str, str]]:
    """Each engine's weights (its model's state dict), hashed, fetched from the actors."""
    models = ray.get([w.call.remote("__getattribute__", "model") for w in setup.rollout.workers])
    return [{k: _digest(v) for k, v in m.state_dict().items()} for m in models]


@pytest.mark.parametrize("layout, transport, mode, code", CASES)
def test_start_up_refit_equals_the_object_store_refit_bitwise(tmp_path, ws_cache, layout, transport, mode, code):
    seen = {}
    for t, m, _ in ((transport, mode, code), STORE):
        setup = build_run(typed(load_recipe("sanity_tiny", _overrides(tmp_path / t, ws_cache, layout, t))), QUIET)
        try:
            group = setup.rollout
            assert group.transport == t and group.last_refit_transport == m
            if t == "ipc":
                assert sorted(group.engine_of_rank) == [0, 1]  # each engine on one trainer rank's bundle
            want = {k: _digest(v.to(torch.float16)) for k, v in setup.policy.rollout_state_dict().items()}
            got = _engine_digests(setup)
            assert len(got) == 2 and all(g == want for g in got)  # bitwise, every weight, both engines
            nbytes = sum(v.numel() * 2 for v in setup.policy.rollout_state_dict().values())
            assert group.last_refit_bytes >= 2 * nbytes  # both engines, bucket alignment padding included
            first = group.last_refit_bytes
            group.refit_from(setup.policy, 1)  # the group (broadcast, relay) is set up once and reused
            assert (group.last_refit_bytes, group.last_refit_transport) == (first, m)
            assert _engine_digests(setup) == got
            seen[t] = (got, first)
        finally:
            setup.close()
        assert not ray.is_initialized()
    assert seen[transport] == seen["object_store"]  # the same weights and the same bytes in both engines


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout, transport, mode, code", CASES)
def test_two_step_run_equals_the_object_store_run(tmp_path, ws_cache, layout, transport, mode, code):
    rows = {}
    for t in (transport, "object_store"):
        out = tmp_path / t
        run(load_recipe("sanity_tiny", _overrides(out, ws_cache, layout, t, "trainer.max_steps=2")), console=QUIET)
        rows[t] = _rows(out)
    a, o = rows[transport], rows["object_store"]
    assert [r["refit/mode"] for r in a] == [code, code] and [r["refit/mode"] for r in o] == [STORE[2]] * 2
    assert a[1]["train/grad_norm"] > 0  # step 2's rollouts come from trained weights
    for ra, ro in zip(a, o, strict=True):
        same = {k for k in ra if k in ro and k != "refit/mode" and not k.startswith(("time/", "perf/", "throughput/"))}
        assert {"reward/mean", "loss/value", "mismatch/kl_k3", "refit/bytes"} <= same
        assert {k: ra[k] for k in same} == {k: ro[k] for k in same}
