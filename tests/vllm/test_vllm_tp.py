"""A vLLM-CPU engine at TP 2 inside a Ray actor that owns a placement-group bundle (the split layout's rollout worker).

In a placement group vLLM 0.32 picks its Ray executor by itself, which vLLM-CPU refuses
("current platform cpu does not support ray"; on GPUs it would ask Ray for GPUs the actor already
holds); the engine asks for the mp executor there (`vllm_engine.executor_backend`). vLLM-CPU
binds each TP worker's threads to its own NUMA node unless told otherwise, so on a one-NUMA-node
host the actor gets `VLLM_CPU_OMP_THREADS_BIND="0|1"` (one core per worker). Run in the vLLM venv
(docs/vllm.md); ~3 min on a shared 2-core machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from nemo_rl_fp16.data import build_char_tokenizer  # noqa: E402
from nemo_rl_fp16.hf_export import write_hf_checkpoint  # noqa: E402
from nemo_rl_fp16.interfaces import SamplingParams  # noqa: E402
from nemo_rl_fp16.precision import PrecisionPolicy  # noqa: E402
from nemo_rl_fp16.rollout.vllm_engine import VllmRolloutEngine  # noqa: E402

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]
TINY_QWEN2 = dict(model_type="qwen2", vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
PARAMS = SamplingParams(num_generations=2, max_new_tokens=8, temperature=1.0, seed=1)


def test_tp2_engine_in_a_ray_bundle_runs_with_mp_and_samples_like_tp1(tmp_path):
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    class Engine:  # defined here so Ray ships it by value (workers cannot import this module)
        """A rollout worker stand-in: builds the package's engine in the actor, samples, refits, samples again."""

        def run(self, folder: str, prompts: list[list[int]], tp: int):
            from safetensors.torch import load_file

            tok = build_char_tokenizer()
            e = VllmRolloutEngine(folder, PrecisionPolicy.from_name("fp32"), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, tensor_parallel_size=tp, refit="reload")
            backend = e.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
            first = e.generate(prompts, PARAMS)
            e.update_weights({k: v.float() for k, v in load_file(str(Path(folder) / "model.safetensors")).items()})
            again = e.generate(prompts, PARAMS)
            e.shutdown()
            return backend, first.input_ids, first.rollout_logp, again.input_ids

    tok = build_char_tokenizer()
    folder = write_hf_checkpoint({"config": TINY_QWEN2}, tmp_path / "m", tok, seed=0)
    prompts = [tok(p)["input_ids"] for p in ["1+2=", "7*8="]]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        pg = placement_group([{"CPU": 2}], strategy="PACK")
        ray.get(pg.ready(), timeout=120)
        actor = ray.remote(Engine).options(
            num_cpus=2, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        ).remote()
        backend, ids, logp, ids_after_refit = ray.get(actor.run.remote(str(folder), prompts, 2), timeout=600)
    finally:
        ray.shutdown()
    assert backend == "mp"
    assert torch.equal(ids_after_refit, ids)  # a refit with the same weights changes nothing
    tp1 = VllmRolloutEngine(folder, PrecisionPolicy.from_name("fp32"), pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, refit="reload")
    try:
        ref = tp1.generate(prompts, PARAMS)
    finally:
        tp1.shutdown()
    assert torch.equal(ref.input_ids, ids)
    torch.testing.assert_close(logp, ref.rollout_logp, rtol=0, atol=1e-5)  # measured 2.4e-7 (TP all-reduce order)
