"""The paper's experiments as commands: the offline mismatch check and the sanity demo.

- `run_mismatch`: for each precision, the rollout engine samples responses token by token (KV
  cache) and the trainer scores the same tokens in one pass; `report.write_report` turns the
  log-probs into KL(µ‖π) tables and plots (arXiv 2510.26788, Fig. 2). MoE: also the router top-k
  flip rate (overall and per layer), and with `policy.router_replay=rollout` the trainer scores with
  the rollout's experts (R3).
- `run_demo`: warm start once (cached), then the demo recipe (`demo_tiny`: long written-out
  additions) in fp16 and in bf16 with the same seed and budget, then the side-by-side report of
  `demo_report.py` (pooled KL, per-step spread, KL by length, accuracy, numerics record).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from nemo_rl_fp16.build import build_rollout_engine, build_tokenizer, initial_weights, resolve_device
from nemo_rl_fp16.config import ConfigError, load_recipe, save_resolved, typed
from nemo_rl_fp16.data import get_dataset
from nemo_rl_fp16.demo_report import write_demo_report
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.loggers import summary_table
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.precision.cpu_numerics import numerics_record
from nemo_rl_fp16.runtime import torch_threads


@dataclass
class OfflineSetup:
    """What the offline commands (`mismatch`, `doctor`) share: device, tokenizer, the prompt set
    (`mismatch.num_prompts` problems, cycled), the starting weights and the sampling parameters."""

    device: str
    tokenizer: Any
    problems: list
    prompts: list[list[int]]
    init: dict | None
    model_cfg: dict
    params: SamplingParams


def offline_setup(rc, console: Console) -> OfflineSetup:
    """Build the `OfflineSetup` of a typed recipe (runs the warm start when the recipe has one)."""
    device = resolve_device(rc)
    tokenizer = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    prompts = [tokenizer(problems[i % len(problems)].prompt)["input_ids"] for i in range(rc.mismatch.num_prompts)]
    params = SamplingParams(max_new_tokens=rc.rollout.max_new_tokens, temperature=rc.rollout.temperature,
                            top_p=rc.rollout.top_p, num_generations=rc.rollout.num_generations, seed=rc.seed,
                            stop_token_ids=(tokenizer.eos_token_id,))
    return OfflineSetup(device, tokenizer, problems, prompts, initial_weights(rc, tokenizer, problems, console),
                        rc.model.model_dump(), params)


def run_mismatch(cfg: DictConfig, console: Console | None = None) -> dict:
    """Offline π-vs-µ mismatch for each precision in `mismatch.precisions`; returns report.json."""
    from nemo_rl_fp16.policy import TorchPolicy
    from nemo_rl_fp16.report import ratio_text, write_report

    console = console or Console()
    rc = typed(cfg)
    policies = mismatch_policies(rc)  # every refusal before anything is written
    out = Path(rc.output_dir)
    save_resolved(cfg, out)
    setup = offline_setup(rc, console)
    device, tokenizer, prompts, init, model_cfg, params = (
        setup.device, setup.tokenizer, setup.prompts, setup.init, setup.model_cfg, setup.params)
    runs = {}
    for name in rc.mismatch.precisions:
        t0 = time.perf_counter()
        train_pol, rollout_pol = policies[name]
        engine = build_rollout_engine(rc, rollout_pol, model_cfg, tokenizer, device, initial_state_dict=init,
                                      model_dir=out / "rollout_model" / name)
        scorer = TorchPolicy(model_cfg, train_pol, lr=rc.policy.lr, weight_decay=0.0, max_grad_norm=1.0,
                                    micro_batch_size=rc.policy.micro_batch_size, seed=rc.seed, device=device,
                                    initial_state_dict=init, router_replay=rc.policy.router_replay)
        batch = engine.generate(prompts, params)
        if hasattr(engine, "shutdown"):  # vLLM: free its KV cache before the next precision
            engine.shutdown()
        train_logp = scorer.logprobs(batch, rc.rollout.temperature)
        runs[name] = {"train_logp": train_logp, "rollout_logp": batch.rollout_logp, "mask": batch.response_mask}
        if batch.rollout_experts is not None:  # MoE: flip rate (overall and per layer) of the trainer's own top-k
            runs[name].update(train_experts=scorer.selected_experts(batch), rollout_experts=batch.rollout_experts,
                              router_replay=rc.policy.router_replay)
        console.print(f"{name}: {batch.num_samples} samples, {int(batch.response_mask.sum())} tokens "
                      f"({time.perf_counter() - t0:.1f}s)")
    report = write_report(out, runs, title=f"π vs µ mismatch: {rc.recipe}",
                          length_buckets=rc.mismatch.length_buckets, seed=rc.seed,
                          numerics=numerics_record(device))
    rows = [(f"KL(µ‖π) k3 {name}", f"{report['runs'][name]['mismatch/kl_k3']:.3e}") for name in runs]
    rows += [(f"KL {k[len('kl_k3_'):-len('_over_fp16')]} vs fp16",
              ratio_text(v, k[len("kl_k3_"):-len("_over_fp16")]).replace("**", ""))
             for k, v in report["ratios"].items()]
    rows.append(("report", str(out / "report.md")))
    console.print(summary_table("mismatch", rows))
    return report


def mismatch_policies(rc) -> dict[str, tuple[PrecisionPolicy, PrecisionPolicy]]:
    """(trainer, rollout) policies for each precision of `mismatch.precisions`: the preset, then the
    recipe's explicit `precision.*` dtype keys (e.g. `logits_dtype`) on both sides.

    Raises:
        ConfigError: `precision.param_dtype` or `precision.rollout` set explicitly — the sweep sets
            the weight dtype of both engines, so such a key would be silently overridden.
    """
    from nemo_rl_fp16.precision import resolve_policies

    block = rc.precision.model_dump()
    for key in ("param_dtype", "rollout"):
        if block.get(key) is not None:
            raise ConfigError(f"bad value for 'precision.{key}': {block[key]}; the mismatch command sets it from "
                              f"mismatch.precisions ({', '.join(rc.mismatch.precisions)}); remove the override "
                              "(or list the precisions to compare in mismatch.precisions)")
    return {name: resolve_policies({**block, "name": name, "rollout": None, "allow_mismatch": False})
            for name in rc.mismatch.precisions}


DEMO_PRECISIONS = ("fp16", "bf16")


def run_demo(overrides: list[str], recipe: str = "demo_tiny", dry_run: bool = False,
             console: Console | None = None) -> int:
    """Warm start, then the recipe in fp16 and bf16 (same seed and budget), then a report."""
    from nemo_rl_fp16.cli import run_command
    from nemo_rl_fp16.trainer import run

    console = console or Console()
    root = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), "outputs/demo")
    rest = [o for o in overrides if not o.startswith("output_dir=")]
    per_run = {p: ["trainer.resume=never", *rest, f"precision={p}", f"output_dir={root}/{p}"] for p in DEMO_PRECISIONS}
    if dry_run:
        for p in DEMO_PRECISIONS:
            code = run_command("rl", [f"recipe={recipe}", "dry_run=true", *per_run[p]])
            if code:
                return code
        return 0
    cfgs = {p: load_recipe(recipe, per_run[p]) for p in DEMO_PRECISIONS}  # all config errors before work
    t0 = time.perf_counter()
    finals = {}
    # One torch thread: the tiny model is overhead-bound, and two OpenMP threads spinning against
    # any other process on a 2-core machine made a rollout 8x slower (measured 11.1 s vs 1.4 s).
    with torch_threads(1):
        for p, cfg in cfgs.items():
            console.rule(f"{cfg.recipe}: {p}")
            finals[p] = run(cfg, console=console)
    summary = write_demo_report(Path(root), {p: Path(cfgs[p].output_dir) for p in DEMO_PRECISIONS},
                                numerics=numerics_record(resolve_device(typed(cfgs["fp16"]))),
                                extra={"wall_s": time.perf_counter() - t0})
    keys = ("kl_k3_pooled", "kl_k3_median_step", "frac_steps_kl_zero", "final_accuracy", "peak_accuracy")
    rows = [(f"{p} {k}", "n/a" if s[k] is None else f"{s[k]:.4g}") for p, s in summary["runs"].items() for k in keys]
    if summary.get("kl_k3_pooled_bf16_over_fp16") is not None:
        rows.append(("pooled KL bf16 / fp16", f"{summary['kl_k3_pooled_bf16_over_fp16']:.1f}x"))
    rows += [("total wall time", f"{summary['wall_s']:.0f}s"), ("report", str(Path(root) / "report.md"))]
    console.print(summary_table("demo: fp16 vs bf16", rows))
    return 0
