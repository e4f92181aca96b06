"""The CPU layout rehearsal of each big recipe, as a user runs it: 2 RL steps on a simulated multi-node Ray cluster.

`nemo-rl-fp16 rehearse recipe=<big recipe>` shrinks the recipe (megatron TP 2 x DP 2 for the dense
one; TP 2 x DP 4 with EP 4 for the MoE, whose EP groups span DP ranks as the recipe's do; Ray split
layout, 2 torch rollout engines in their own actors; tiny config-built model) and runs it through
the normal run path on a `ray.cluster_utils.Cluster` shaped like the recipe's split layout: its
trainer nodes (dense: 1, MoE: 2, one EP group each) and a node for the engines.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

pytest.importorskip("ray")
pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")  # one warm start per model family, shared by the module's runs


def _rehearse(recipe: str, out: Path, ws: Path) -> tuple[str, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", "rehearse", f"recipe={recipe}",
                           f"output_dir={out}", f"warm_start.cache_dir={ws}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, rows


@pytest.mark.parametrize("recipe, ranks, replicated, moe, trainer_nodes", [("dense_14b_fp16", 4, 5, False, 1),
                                                                           ("moe_30b_a3b_fp16", 8, 11, True, 2)])
def test_rehearsal_of_big_recipe_runs_two_steps_on_a_simulated_multi_node_cluster(tmp_path, ws_cache, recipe, ranks,
                                                                                   replicated, moe, trainer_nodes):
    out, rows = _rehearse(recipe, tmp_path / "run", ws_cache)
    flat = " ".join(out.split())  # rich wraps long lines
    # the layout kinds: megatron ranks over gloo as Ray actors, split layout, two rollout engines in their own actors
    assert f"ray: {ranks} x MegatronPolicy ranks (gloo) + 2 rollout engines, split on cpu" in flat
    if moe:  # EP groups of 4 ranks hold 2 TP groups each, with their own rows (megatron's allgather dispatcher)
        assert "TP 2 x DP 8 (EP 8) -> TP 2 x DP 4 (EP 4)" in flat and "an EP group covers 2 TP group(s)" in flat
    else:
        assert "TP 4 x DP 2 (EP 1) -> TP 2 x DP 2 (EP 1)" in flat
    assert "sequence parallel: off (the recipe: on)" in flat
    # where each rank landed: trainer ranks on the trainer nodes, the engines on their own node, as the recipe
    placed = re.search(r"placement: trainer ranks (\{.*?\}); rollout engines (\{.*?\})", flat)
    assert placed, flat[-3000:]
    trainer_at = set(re.findall(r"'(node\d)'", placed.group(1)))
    engine_at = set(re.findall(r"'(node\d)'", placed.group(2)))
    assert len(trainer_at) == trainer_nodes and len(engine_at) == 1 and not trainer_at & engine_at, placed.group(0)
    assert len(re.findall(r"\d: 'node\d'", placed.group(0))) == ranks + 2
    groups = re.search(r"TP groups: (.*?)(\(|TP replicas|step 1)", flat).group(1)
    assert re.findall(r"ranks \[(\d), (\d)\]", groups) == [(str(r), str(r + 1)) for r in range(0, ranks, 2)]
    # node-aware rank order (`placement.node_local_ranks`): no TP group crosses a node
    spans = re.findall(r"on \[([^\]]*)\]", groups)
    assert len(spans) == ranks // 2 and all(len(on.split(", ")) == 1 for on in spans), groups
    assert "span nodes" not in flat and "warning: ray placement" not in flat
    # 2 RL steps, every metric finite, and they trained (a gradient, weights refit to both engines)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert r["refit/bytes"] > 0 and r["train/overflow_skips"] == 0
    assert any(r["train/grad_norm"] > 0 for r in rows)
    assert all(r["mismatch/kl_k3"] < 1e-3 for r in rows)  # trainer (megatron) and rollout (torch) agree
    assert moe == all("mismatch/router_topk_flip_rate" in r for r in rows)
    # finalize_model_grads keeps the TP ranks' replicated weights (norms, q/k norms, routers) bitwise equal
    assert f"TP replicas: {replicated} replicated parameters per rank, 0 differ across a TP group" in flat
    assert f"rehearsal of {recipe}: 2 RL steps done" in flat
