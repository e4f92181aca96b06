"""The `mismatch` command: offline π-vs-µ mismatch across precisions (arXiv 2510.26788, Fig. 2).

    nemo-rl-fp16 mismatch recipe=mismatch_tiny

For each precision of `mismatch.precisions`, the recipe's rollout engine (`rollout.backend`)
samples responses token by token (KV cache) and the recipe's trainer (`policy.backend`) scores
the same tokens in one pass; `report.write_report` turns the log-probs into KL(µ‖π) tables and
plots. MoE: also the router top-k flip rate (overall and per layer), and with
`policy.router_replay=rollout` the trainer scores with the rollout's experts (R3). A backend that
cannot run here is refused by the validation stage (e.g. `device=cuda` under Ray without declared GPUs: `plan.device_problems`).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from nemo_rl_fp16.assembly import check_policy_backend, offline_setup
from nemo_rl_fp16.commands.validate import validate
from nemo_rl_fp16.config import ConfigError, RecipeConfig, load_recipe, save_resolved, typed
from nemo_rl_fp16.loggers import summary_table
from nemo_rl_fp16.policy import build_policy
from nemo_rl_fp16.precision import PrecisionPolicy, resolve_policies
from nemo_rl_fp16.precision.cpu_numerics import numerics_record
from nemo_rl_fp16.report import ratio_text, write_report
from nemo_rl_fp16.rollout import build_rollout_engine


def main(recipe: str, overrides: list[str], dry_run: bool) -> int:
    """`nemo-rl-fp16 mismatch`: validate, then `run_mismatch` (or print the plan with `dry_run`).

    Args:
        recipe (str): a packaged recipe name or a YAML path.
        overrides (list[str]): OmegaConf dotlist overrides.
        dry_run (bool): validate and print only.

    Returns:
        int: the exit code (0; errors are raised and mapped by `cli.run_command`).
    """
    cfg = load_recipe(recipe, overrides)
    if not validate("mismatch", cfg, dry_run):
        run_mismatch(cfg)
    return 0


def run_mismatch(cfg: DictConfig, console: Console | None = None) -> dict:
    """Offline π-vs-µ mismatch for each precision in `mismatch.precisions`.

    Writes `report.md`, `report.json` and the plots to `output_dir` (`report.write_report`).

    Args:
        cfg (DictConfig): the loaded recipe.
        console (Console | None): where progress and the summary go.

    Returns:
        dict: the contents of report.json (per-precision `mismatch/*` metrics, KL ratios).

    Raises:
        ConfigError: an explicit `precision.param_dtype` / `precision.rollout` (`mismatch_policies`)
            or a trainer backend this install cannot build (`assembly.check_policy_backend`).
    """
    console = console or Console()
    rc = typed(cfg)
    policies = mismatch_policies(rc)  # every refusal before anything is written
    check_policy_backend(rc)
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
        scorer = build_policy(rc, model_cfg, train_pol, device, init)
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


def mismatch_policies(rc: RecipeConfig) -> dict[str, tuple[PrecisionPolicy, PrecisionPolicy]]:
    """(trainer, rollout) policies for each precision of `mismatch.precisions`.

    The preset, then the recipe's explicit `precision.*` dtype keys (e.g. `logits_dtype`) on both sides.

    Args:
        rc (RecipeConfig): the typed recipe.

    Returns:
        dict[str, tuple[PrecisionPolicy, PrecisionPolicy]]: precision name -> (trainer, rollout).

    Raises:
        ConfigError: `precision.param_dtype` or `precision.rollout` set explicitly — the sweep sets
            the weight dtype of both engines, so such a key would be silently overridden.
    """
    block = rc.precision.model_dump()
    for key in ("param_dtype", "rollout"):
        if block.get(key) is not None:
            raise ConfigError(f"bad value for 'precision.{key}': {block[key]}; the mismatch command sets it from "
                              f"mismatch.precisions ({', '.join(rc.mismatch.precisions)}); remove the override "
                              "(or list the precisions to compare in mismatch.precisions)")
    return {name: resolve_policies({**block, "name": name, "rollout": None, "allow_mismatch": False})
            for name in rc.mismatch.precisions}
