"""A vLLM engine at TP 2 inside a Ray actor that owns a placement-group bundle asks for vLLM's mp executor.

The actor is placed like a `split` rollout worker (`PlacementGroupSchedulingStrategy`, one bundle);
in it, `vllm.LLM` alone is replaced by a stand-in that records its keyword arguments and stops the
start (no vLLM needed), so the check reads what the engine really passes to vLLM. vLLM 0.32 would
choose its Ray executor there by itself (a current placement group); `executor_backend` documents why
the package asks for `"mp"` instead. Outside Ray: `tests/unit/rollout/test_vllm_executor.py`.
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[2]


def test_tp2_engine_in_a_ray_bundle_gets_the_mp_executor_tp1_no_choice(tmp_path):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    class EngineProbe:  # defined here so Ray ships it by value; it imports this worktree's package
        def llm_kwargs(self, folder: str, tp: int) -> dict:
            import sys
            import types

            from nemo_rl_fp16.precision import PrecisionPolicy
            from nemo_rl_fp16.rollout.vllm_engine import VllmRolloutEngine

            class Started(Exception):
                pass

            def llm(**kw):
                raise Started(kw)

            sys.modules["vllm"] = types.SimpleNamespace(LLM=llm)
            try:
                VllmRolloutEngine(folder, PrecisionPolicy.from_name("fp16"), pad_token_id=0, eos_token_id=1,
                                  tensor_parallel_size=tp, refit="reload")
            except Started as e:
                return e.args[0]
            raise AssertionError("vllm.LLM was never called")

    import torch
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2, 2, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    try:
        pg = placement_group([{"CPU": 1}], strategy="PACK")
        ray.get(pg.ready(), timeout=120)
        probe = ray.remote(EngineProbe).options(
            num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        ).remote()
        tp2, tp1 = ray.get([probe.llm_kwargs.remote(str(tmp_path), 2), probe.llm_kwargs.remote(str(tmp_path), 1)])
        assert tp2["tensor_parallel_size"] == 2 and tp2["distributed_executor_backend"] == "mp"
        assert tp1["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in tp1
        ray.kill(probe)
        remove_placement_group(pg)
    finally:
        ray.shutdown()
