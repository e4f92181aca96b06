"""The kind-test: every leaf key of recipes/base.yaml changes what runs, or is refused. No key is
accepted and silently ignored.

`TABLE` maps each dotted key to (context overrides, the key's override, probe, observable). The
test builds the probe twice, with the context alone and with the key's override on top, and
asserts that the observable differs; a `REFUSED` entry asserts that the validation stage
(`plan.check_run`) refuses the override with a line naming the key. Probes are what runs: the
resolved plan, the built trainer, the built data / reward / initial weights, the RL loop's
sampling and prompt order, a 1-2 step tiny run (its metrics, files and console), the mismatch
command's report. A key of base.yaml without an entry fails the test by name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from nemo_rl_fp16.config import ConfigError, load_recipe, recipes_dir, typed
from nemo_rl_fp16.guards import NonFiniteError
from nemo_rl_fp16.plan import check_run, make_plan
from nemo_rl_fp16.precision import PrecisionMismatchError, resolve_policies

REFUSED = "refused"
MEGATRON = ["policy.backend=megatron", "device=cuda", "cluster.gpus_per_node=2"]
RAY = ["cluster.ray.enabled=true"]
JSONL = ["data.dataset=jsonl", "data.path={jsonl}", "data.template=plain"]
WARM = ["warm_start.enabled=true"]  # rewards > 0 so that advantages (and updates) are not all zero
LORA = ["policy.lora.enabled=true"]
MOE = ["model.config.model_type=qwen3_moe", "model.config.num_experts=4", "model.config.num_experts_per_tok=2",
       "model.config.moe_intermediate_size=32"]


def _leaf_keys() -> list[str]:
    def walk(node, prefix):
        for k, v in node.items():
            if OmegaConf.is_dict(v) and len(v):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    return list(walk(OmegaConf.load(recipes_dir() / "base.yaml"), ""))


def plan(key):
    return lambda o: str(o["plan"][key])


def last(metric):
    return lambda o: o["metrics"].get(metric)


#: key -> (context, override(s), probe, observable of the probe's result)
TABLE: dict[str, tuple[list[str], list[str], str, object]] = {
    "recipe": ([], ["recipe=other"], "plan", plan("output_dir")),
    "seed": ([], ["seed=7"], "init", lambda w: float(w["model.embed_tokens.weight"].sum())),
    "output_dir": ([], ["output_dir=elsewhere"], "plan", plan("output_dir")),
    "device": ([], ["device=cuda"], "plan", plan("device")),
    "precision.name": ([], ["precision=bf16"], "trainer", lambda t: t.compute.model.embed_tokens.weight.dtype),
    "precision.param_dtype": ([], ["precision.param_dtype=float32"], "trainer",
                              lambda t: t.compute.model.embed_tokens.weight.dtype),
    "precision.compute_dtype": ([], ["precision.compute_dtype=float32"], REFUSED, None),
    "precision.grad_reduce_dtype": ([], ["precision.grad_reduce_dtype=bfloat16"], "trainer",
                                    lambda t: t.precision.grad_reduce_dtype),
    "precision.master_dtype": ([], ["precision.master_dtype=float16"], REFUSED, None),
    "precision.logits_dtype": ([], ["precision.logits_dtype=bfloat16"], "logp", lambda lp: lp.tolist()),
    # fp32 router on an MoE trainer: the gate weights stay fp32 and its logits come out fp32 (vLLM: refused,
    # test_moe_routing; megatron's moe_router_dtype: policy/megatron/test_policy)
    "precision.router_dtype": (MOE, ["precision.router_dtype=float32"], "trainer",
                               lambda t: (t.compute.model.layers[0].mlp.gate.weight.dtype,
                                          t.compute.model.layers[0].mlp.gate(
                                              torch.ones(1, 128, dtype=torch.float16))[0].dtype)),
    "precision.kv_cache_dtype": ([], ["precision.kv_cache_dtype=float32"], REFUSED, None),
    "precision.loss_scale.enabled": ([], ["precision.loss_scale.enabled=false"], "trainer", lambda t: t.scaler is None),
    "precision.loss_scale.initial_scale": ([], ["precision.loss_scale.initial_scale=1024"], "trainer",
                                           lambda t: t.scaler.scale),
    "precision.loss_scale.min_scale": ([], ["precision.loss_scale.min_scale=4"], "trainer", lambda t: t.scaler.min_scale),
    "precision.loss_scale.growth_factor": ([], ["precision.loss_scale.growth_factor=4"], "trainer",
                                           lambda t: t.scaler.growth_factor),
    "precision.loss_scale.backoff_factor": ([], ["precision.loss_scale.backoff_factor=0.25"], "trainer",
                                            lambda t: t.scaler.backoff_factor),
    "precision.loss_scale.growth_interval": ([], ["precision.loss_scale.growth_interval=5"], "trainer",
                                             lambda t: t.scaler.growth_interval),
    "precision.loss_scale.hysteresis": ([], ["precision.loss_scale.hysteresis=1"], "trainer",
                                        lambda t: t.scaler.hysteresis),
    "precision.rollout": (["precision.allow_mismatch=true"], ["precision.rollout=bf16"], "plan",
                          plan("precision contract")),
    "precision.allow_mismatch": (["precision.rollout=bf16"], ["precision.allow_mismatch=true"], "plan",
                                 plan("precision contract")),
    "precision.preflight": ([], ["precision.preflight=off"], "run", lambda o: "preflight (fp16)" in o["console"]),
    "model.name_or_path": ([], ["model.config=null", "model.name_or_path=/some/local/model"], "plan", plan("model")),
    "model.config": ([], ["model.config.hidden_size=64"], "trainer", lambda t: t.master.config.hidden_size),
    "model.tokenizer": ([], ["model.tokenizer={tokenizer}"], "tokenizer", lambda tok: len(tok)),
    "model.trust_remote_code": ([], ["model.trust_remote_code=true"], "loader_kwargs",
                                lambda kw: kw.get("trust_remote_code")),
    "policy.backend": (["device=cuda"], ["policy.backend=megatron"], "plan", plan("trainer")),
    "policy.lr": ([], ["policy.lr=0.5"], "trainer", lambda t: t.optimizer.param_groups[0]["lr"]),
    "policy.weight_decay": ([], ["policy.weight_decay=0.1"], "trainer",
                            lambda t: t.optimizer.param_groups[0]["weight_decay"]),
    "policy.max_grad_norm": ([], ["policy.max_grad_norm=0.5"], "trainer", lambda t: t.max_grad_norm),
    "policy.micro_batch_size": ([], ["policy.micro_batch_size=3"], "trainer", lambda t: t.micro_batch_size),
    "policy.tensor_parallel_size": (MEGATRON, ["policy.tensor_parallel_size=2"], "plan", plan("layout")),
    "policy.pipeline_parallel_size": (MEGATRON, ["policy.pipeline_parallel_size=2"], "plan", plan("layout")),
    "policy.expert_parallel_size": (MEGATRON, ["policy.expert_parallel_size=2"], REFUSED, None),  # dense model
    "policy.context_parallel_size": (MEGATRON, ["policy.context_parallel_size=2"], REFUSED, None),
    "policy.sequence_parallel": ([], ["policy.sequence_parallel=true"], REFUSED, None),  # torch backend
    "policy.activation_checkpointing": ([], ["policy.activation_checkpointing=true"], "trainer",
                                        lambda t: sum(getattr(m, "gradient_checkpointing", False)
                                                      for m in t.compute.modules())),
    "policy.sequence_packing": ([], ["policy.sequence_packing=true"], "trainer", lambda t: t.loop.packing),  # numbers: policy/test_packing
    "policy.attention": ([], ["policy.attention=sdpa"], REFUSED, None),
    "policy.fused_elementwise": ([], ["policy.fused_elementwise=true"], REFUSED, None),
    "policy.use_distributed_optimizer": (MEGATRON, ["policy.use_distributed_optimizer=false"], "plan", plan("memory/GPU")),
    "policy.router_replay": ([], ["policy.router_replay=rollout"], REFUSED, None),  # dense model (MoE, rollout|trainer: test_moe_routing, policy/megatron/test_routing)
    "policy.lora.enabled": ([], ["policy.lora.enabled=true"], "trainer",
                            lambda t: sum(p.numel() for p in t.master.parameters() if p.requires_grad)),
    "policy.lora.rank": (LORA, ["policy.lora.rank=2"], "trainer",
                         lambda t: sum(p.numel() for p in t.master.parameters() if p.requires_grad)),
    "policy.lora.alpha": (LORA, ["policy.lora.alpha=8"], "trainer", lambda t: t.master.peft_config["default"].lora_alpha),
    "policy.lora.target_modules": (LORA, ["policy.lora.target_modules=[q_proj]"], "trainer",
                                   lambda t: sorted(t.master.peft_config["default"].target_modules)),
    "rollout.backend": ([], ["rollout.backend=vllm"], "plan", plan("rollout")),
    "rollout.num_generations": ([], ["rollout.num_generations=2"], "sampling", lambda s: s.num_generations),
    "rollout.max_new_tokens": ([], ["rollout.max_new_tokens=3"], "sampling", lambda s: s.max_new_tokens),
    "rollout.temperature": ([], ["rollout.temperature=0.5"], "sampling", lambda s: s.temperature),
    "rollout.top_p": ([], ["rollout.top_p=0.5"], "sampling", lambda s: s.top_p),
    "rollout.tensor_parallel_size": ([], ["rollout.tensor_parallel_size=2"], REFUSED, None),  # torch rollout
    "rollout.gpu_memory_utilization": ([], ["rollout.gpu_memory_utilization=0.9"], REFUSED, None),
    "rollout.enforce_eager": ([], ["rollout.enforce_eager=true"], REFUSED, None),
    "rollout.refit_bucket_mb": ([], ["rollout.refit_bucket_mb=64"], REFUSED, None),  # torch rollout
    "rollout.refit_transport": ([], ["rollout.refit_transport=ipc"], REFUSED, None),  # without Ray
    "algorithm.name": ([], ["algorithm.name=gspo"], "plan", plan("algorithm")),
    "algorithm.correction": ([], ["algorithm.correction=mis"], "plan", plan("algorithm")),
    "algorithm.clip_low": ([], ["algorithm.clip_low=0.1"], "plan", plan("algorithm")),
    "algorithm.clip_high": ([], ["algorithm.clip_high=0.3"], "plan", plan("algorithm")),
    "algorithm.is_cap": ([*WARM, "algorithm.correction=mis"], ["algorithm.is_cap=0.5"], "run",
                         last("loss/mis_masked_fraction")),
    "algorithm.reduction": ([], ["algorithm.reduction=seq_mean_token_sum"], "plan", plan("algorithm")),
    "algorithm.normalize_std": (WARM, ["algorithm.normalize_std=false"], "run", last("loss/value")),
    "algorithm.kl_coef": (WARM, ["algorithm.kl_coef=0.1"], "run", last("loss/kl_to_ref")),
    "algorithm.kl_kind": ([*WARM, "algorithm.kl_coef=0.1", "trainer.max_steps=2"], ["algorithm.kl_kind=k1"], "run",
                          last("loss/kl_to_ref")),
    "algorithm.updates_per_rollout": (WARM, ["algorithm.updates_per_rollout=2"], "run", last("loss/ratio_mean")),
    "data.dataset": ([], ["data.dataset=sanity_reverse"], "data", lambda ps: ps[0].prompt),
    "data.path": (JSONL, ["data.path={jsonl2}"], "data", lambda ps: len(ps)),
    "data.eval_path": ([*JSONL, "trainer.eval_every=1", "data.eval_path={jsonl}"], ["data.eval_path={jsonl2}"],
                       "eval_set", lambda ps: len(ps)),
    "data.prompt_key": (JSONL, ["data.prompt_key=question"], "data", lambda ps: ps[0].prompt),
    "data.answer_key": (JSONL, ["data.answer_key=solution"], "data", lambda ps: ps[0].answer),
    "data.template": (JSONL, ["data.template=Q-{prompt}"], "data", lambda ps: ps[0].prompt),
    "data.prompts_per_step": ([], ["data.prompts_per_step=2"], "order", lambda idx: len(idx)),
    "data.num_problems": ([], ["data.num_problems=10"], "data", lambda ps: len(ps)),
    "data.eval_num_problems": (["trainer.eval_every=1"], ["data.eval_num_problems=5"], "eval_set", lambda ps: len(ps)),
    "data.seed": ([], ["data.seed=3"], "order", lambda idx: idx),
    "reward.name": ([], ["reward.name=math_verify"], "reward", lambda r: r("the answer is \\boxed{4}", "4")),
    # 9: never the automatic count (min(8, CPUs)); the pooled values are the serial ones (test_reward_processes)
    "reward.workers": ([], ["reward.workers=9"], "scorer", lambda s: s.workers),
    "warm_start.enabled": ([], ["warm_start.enabled=true"], "init", lambda w: float(w["lm_head.weight"].sum())),
    "warm_start.steps": (["warm_start.enabled=true"], ["warm_start.steps=3"], "init",
                         lambda w: float(w["lm_head.weight"].sum())),
    "warm_start.lr": (["warm_start.enabled=true"], ["warm_start.lr=0.01"], "init",
                      lambda w: float(w["lm_head.weight"].sum())),
    "warm_start.batch_size": (["warm_start.enabled=true"], ["warm_start.batch_size=4"], "init",
                              lambda w: float(w["lm_head.weight"].sum())),
    "warm_start.cache_dir": (["warm_start.enabled=true"], ["warm_start.cache_dir={tmp}/other_cache"], "init_files",
                             lambda files: files),
    "trainer.max_steps": ([], ["trainer.max_steps=2"], "run", lambda o: len(o["rows"])),
    "trainer.eval_every": ([], ["trainer.eval_every=1"], "run", last("eval/mean@k")),
    "trainer.eval_k": (["trainer.eval_every=1"], ["trainer.eval_k=2"], "run", last("eval/k")),
    "trainer.save_every": (["trainer.max_steps=2"], ["trainer.save_every=1"], "run", lambda o: o["checkpoints"]),
    "trainer.log_every": (["trainer.max_steps=3"], ["trainer.log_every=2"], "run",
                          lambda o: [r["step"] for r in o["rows"]]),
    "trainer.resume": ([], ["trainer.resume=auto"], "plan", plan("steps")),
    "trainer.keep_last": (["trainer.max_steps=3", "trainer.save_every=1"], ["trainer.keep_last=1"], "run",
                          lambda o: o["checkpoints"]),
    "trainer.max_overflow_retries": ([*WARM, "precision.loss_scale.initial_scale=1e30", "precision.loss_scale.hysteresis=1"],
                                     ["trainer.max_overflow_retries=1"], "run", last("train/overflow_retries")),
    "trainer.headroom_every": ([], ["trainer.headroom_every=0"], "run", last("range/fp16_headroom")),
    "trainer.export_hf": ([], ["trainer.export_hf=true"], "run", lambda o: o["files"]),
    "logging.jsonl": ([], ["logging.jsonl=false"], "run", lambda o: "metrics.jsonl" in o["files"]),
    "logging.tensorboard": ([], ["logging.tensorboard=true"], "run", lambda o: "tensorboard" in o["files"]),
    "logging.progress": ([], ["logging.progress=true"], "run", lambda o: "━" in o["console"]),
    "logging.wandb.enabled": ([], ["logging.wandb.enabled=true"], "refused_or_run", None),
    "logging.wandb.project": (["logging.wandb.enabled=true"], ["logging.wandb.project=p"], "refused_or_run", None),
    "logging.mlflow.enabled": ([], ["logging.mlflow.enabled=true"], "refused_or_run", None),
    "logging.mlflow.project": (["logging.mlflow.enabled=true"], ["logging.mlflow.project=p"], "refused_or_run", None),
    "cluster.nodes": (MEGATRON, ["cluster.nodes=2"], "plan", plan("layout")),
    "cluster.gpus_per_node": (["device=auto"], ["cluster.gpus_per_node=1"], "plan", plan("device")),
    # the plan's fit check (a layout over it is refused: tests/unit/test_memory_budget.py)
    "cluster.gpu_memory_gb": (MEGATRON, ["cluster.gpu_memory_gb=80"], "plan", plan("memory/peak")),
    "cluster.ray.enabled": ([], ["cluster.ray.enabled=true"], "plan", plan("placement")),
    "cluster.ray.address": (RAY, ["cluster.ray.address=10.0.0.1:6379"], "plan", plan("placement")),
    "cluster.ray.layout": (RAY, ["cluster.ray.layout=split"], "plan", plan("placement")),
    "cluster.ray.trainer_workers": (RAY, ["cluster.ray.trainer_workers=2"], "plan", plan("layout")),
    "cluster.ray.rollout_workers": ([*RAY, "cluster.ray.layout=split"], ["cluster.ray.rollout_workers=2"], "plan", plan("placement")),
    "cluster.ray.cpus_per_worker": (RAY, ["cluster.ray.cpus_per_worker=2"], "plan", plan("placement")),
    "mismatch.precisions": ([], ["mismatch.precisions=[fp32]"], "mismatch", lambda r: sorted(r["runs"])),
    "mismatch.num_prompts": ([], ["mismatch.num_prompts=3"], "mismatch",
                             lambda r: r["runs"]["fp32"].get("num_samples", json.dumps(r["runs"]["fp32"]))),
    "mismatch.length_buckets": ([], ["mismatch.length_buckets=[1,2]"], "run",
                                lambda o: sorted(k for k in o["metrics"] if k.startswith("mismatch/kl_by_length"))),
}

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    rows = [{"prompt": f"{a}+{a}=", "question": f"what is {a}+{a}", "answer": str(2 * a), "solution": f"= {2 * a}"}
            for a in range(10, 16)]
    (tmp / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    from nemo_rl_fp16.data import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+=")
    tok.save_pretrained(tmp / "tok")
    return {"tmp": tmp, "jsonl": tmp / "a.jsonl", "jsonl2": tmp / "b.jsonl", "tokenizer": tmp / "tok",
            "cache": {}, "n": [0]}


def _overrides(env, items):
    subst = {k: str(env[k]) for k in ("tmp", "jsonl", "jsonl2", "tokenizer")}
    return [o.format(**subst) if "{" in o and "{prompt}" not in o else o for o in items]


def _load(env, items):
    env["n"][0] += 1
    base = [f"output_dir={env['tmp']}/run{env['n'][0]}", f"warm_start.cache_dir={env['tmp']}/ws", "warm_start.steps=40",
            "warm_start.enabled=false", "logging.progress=false", "logging.tensorboard=false", "trainer.resume=never",
            "trainer.max_steps=1", "trainer.save_every=0", "data.prompts_per_step=4", "rollout.num_generations=4",
            "policy.micro_batch_size=16"]
    return load_recipe("sanity_tiny", base + _overrides(env, items))


def _probe(env, kind, items):
    key = (kind, tuple(items))
    if key in env["cache"]:
        return env["cache"][key]
    try:
        cfg = _load(env, items)
        out = PROBES[kind](typed(cfg), cfg)
    except (PrecisionMismatchError, NonFiniteError) as e:  # a refusal/stop (e.g. an undeclared ablation, an
        out = f"refused: {e}"                                # overflow persisting over N attempts) is observable too
    env["cache"][key] = out
    return out


def _trainer(rc, cfg):
    from nemo_rl_fp16.policy import build_policy

    train, _ = resolve_policies(rc.precision.model_dump())
    return build_policy(rc, rc.model.model_dump(), train, "cpu", None)


def _logp(rc, cfg):
    from nemo_rl_fp16.assembly import build_tokenizer
    from nemo_rl_fp16.interfaces import SamplingParams
    from nemo_rl_fp16.rollout import build_rollout_engine

    tok = build_tokenizer(rc)
    train, roll = resolve_policies(rc.precision.model_dump())
    eng = build_rollout_engine(rc, roll, rc.model.model_dump(), tok, "cpu", initial_state_dict=None,
                               model_dir=Path(rc.output_dir))
    batch = eng.generate([tok("12+34=")["input_ids"]], SamplingParams(max_new_tokens=4, num_generations=2, seed=1))
    return torch.cat([batch.rollout_logp.flatten(), _trainer(rc, cfg).logprobs(batch, 1.0).flatten()])


def _init(rc, cfg):
    from nemo_rl_fp16.assembly import build_tokenizer, initial_weights
    from nemo_rl_fp16.data import get_dataset

    return initial_weights(rc, build_tokenizer(rc), get_dataset(rc.data.model_dump(), seed=rc.seed), QUIET)


def _init_files(rc, cfg):
    _init(rc, cfg)
    return sorted(str(p) for p in Path(rc.warm_start.cache_dir).rglob("*") if p.is_file())


def _loader_kwargs(rc, cfg):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_config

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    transformers.AutoModelForCausalLM.from_config = spy
    try:
        _trainer(rc, cfg)
    finally:
        transformers.AutoModelForCausalLM.from_config = real
    return seen


def _loop(rc):
    from nemo_rl_fp16.assembly import build_tokenizer
    from nemo_rl_fp16.data import get_dataset
    from nemo_rl_fp16.trainer import RLTrainer

    tok = build_tokenizer(rc)
    setup = SimpleNamespace(policy=None, rollout=None, reference=None, tokenizer=tok,
                            problems=get_dataset(rc.data.model_dump(), seed=rc.seed))
    return RLTrainer(rc, setup, QUIET)


def _run(rc, cfg):
    from nemo_rl_fp16.commands.rl import run

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    metrics = run(cfg, console=console)
    out = Path(rc.output_dir)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").exists() else []
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else []
    return {"metrics": metrics, "rows": rows, "files": sorted(p.name for p in out.iterdir()), "checkpoints": ckpts,
            "console": buf.getvalue()}


def _mismatch(rc, cfg):
    from nemo_rl_fp16.commands.mismatch import run_mismatch

    cfg = OmegaConf.merge(cfg, {"rollout": {"max_new_tokens": 3}, "mismatch": {"length_buckets": [1, 2, 3]}})
    if cfg.mismatch.num_prompts == 64:
        cfg.mismatch.num_prompts = 2
    return run_mismatch(cfg, console=QUIET)


def _refused_or_run(rc, cfg):
    try:
        check_run(rc)
    except ConfigError as e:
        return str(e)
    return _run(rc, cfg)


PROBES = {
    "plan": lambda rc, cfg: {"plan": make_plan(rc)},
    "trainer": _trainer,
    "logp": _logp,
    "init": _init,
    "init_files": _init_files,
    "loader_kwargs": _loader_kwargs,
    "tokenizer": lambda rc, cfg: __import__("nemo_rl_fp16.assembly", fromlist=["x"]).build_tokenizer(rc),
    "data": lambda rc, cfg: __import__("nemo_rl_fp16.data", fromlist=["x"]).get_dataset(rc.data.model_dump(),
                                                                                        seed=rc.seed),
    "eval_set": lambda rc, cfg: __import__("nemo_rl_fp16.evaluation", fromlist=["x"]).eval_problems(
        rc, __import__("nemo_rl_fp16.data", fromlist=["x"]).get_dataset(rc.data.model_dump(), seed=rc.seed)),
    "order": lambda rc, cfg: _loop(rc).prompts_for_step(0),
    "sampling": lambda rc, cfg: _loop(rc).sampling,
    "reward": lambda rc, cfg: __import__("nemo_rl_fp16.data", fromlist=["x"]).get_reward(rc.reward.name),
    "scorer": lambda rc, cfg: __import__("nemo_rl_fp16.data.reward_pool", fromlist=["x"]).RewardScorer(
        rc.reward.name, __import__("nemo_rl_fp16.data", fromlist=["x"]).get_reward(rc.reward.name), rc.reward.workers),
    "run": _run,
    "mismatch": _mismatch,
    "refused_or_run": _refused_or_run,
}


def test_table_covers_every_key_of_base_yaml():
    keys = _leaf_keys()
    missing = [k for k in keys if k not in TABLE]
    stale = [k for k in TABLE if k not in keys]
    assert not missing, f"base.yaml keys with no observable in TABLE (add one, or refuse the key): {missing}"
    assert not stale, f"TABLE entries for keys base.yaml no longer has: {stale}"


@pytest.mark.parametrize("key", list(TABLE))
def test_key_changes_what_runs_or_is_refused(env, key):
    context, override, probe, observe = TABLE[key]
    if probe == REFUSED:
        with pytest.raises((ConfigError, PrecisionMismatchError)) as e:
            check_run(typed(_load(env, [*context, *override])))
        lines = str(e.value).splitlines()
        assert any(key in line for line in lines), (key, lines)
        return
    if probe == "refused_or_run":  # an optional package: refused when absent, else the run's output
        enabled = key.rsplit(".", 1)[0] + ".enabled"
        new = _probe(env, probe, [*context, *override])
        if isinstance(new, str):
            assert f"'{enabled}'" in new and "not installed" in new
            return
        pytest.skip(f"{key}: the package is installed here; its logger's own tests cover it")
    base, new = (_probe(env, probe, items) for items in (context, [*context, *override]))
    base, new = (o if isinstance(o, str) else observe(o) for o in (base, new))
    assert base != new, f"{key}={override} did not change the {probe} observable ({base!r})"
