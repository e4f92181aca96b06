"""The RL loop: rollout -> reward -> advantages -> π log-probs -> loss -> step -> refit.

One story, top to bottom (`RLTrainer.step`). The loop talks to its engines only through the
`PolicyTrainer` / `RolloutEngine` protocols, so the same loop drives the torch engines on a CPU
and Megatron + vLLM on a cluster. Every step logs reward, the π-vs-µ mismatch metrics, the loss
scale and overflow skips, so a user sees the precision story of their own run.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.algorithms import group_advantages, kl_penalty, policy_loss
from nemo_rl_fp16.build import RunSetup, build_run
from nemo_rl_fp16.config import RecipeConfig, save_resolved, typed
from nemo_rl_fp16.guards import NonFiniteError, check_reward, check_update, check_weights
from nemo_rl_fp16.interfaces import PolicyTrainer, RolloutBatch, RolloutEngine, SamplingParams, TrainStepResult
from nemo_rl_fp16.loggers import MetricsLogger, progress_bar, summary_table
from nemo_rl_fp16.mismatch import mismatch_metrics
from nemo_rl_fp16.precision import PrecisionMismatchError, resolve_policies
from nemo_rl_fp16.runs import (
    RunLock,
    check_model_folders,
    check_output_dir,
    prepare_run_dir,
    run_identity,
    storage_error_message,
)

SEQUENCE_LEVEL = ("gspo", "pg_seq_is")


@dataclass
class RunState:
    """What a checkpoint must hold besides the engines' own state."""

    step: int = 0
    skipped_updates: int = 0


class RLTrainer:
    """Owns one `PolicyTrainer`, one `RolloutEngine` and the data; runs `trainer.max_steps` steps."""

    def __init__(self, cfg: RecipeConfig, run: RunSetup, console: Console | None = None):
        self.cfg = cfg
        self.run = run
        self.policy: PolicyTrainer = run.policy
        self.rollout: RolloutEngine = run.rollout
        self.ref: PolicyTrainer | None = run.reference
        self.console = console or Console()
        self.state = RunState()
        train_policy = resolve_policies(cfg.precision.model_dump())[0]
        self.loss_scaling = train_policy.loss_scale.enabled  # a skipped update is an fp16 overflow only then
        self.param_dtype = train_policy.param_dtype
        self.identity: dict | None = None  # set by `run`: stored with every checkpoint
        self.sampling = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            num_generations=cfg.rollout.num_generations,
            seed=cfg.seed,
            stop_token_ids=(run.tokenizer.eos_token_id,),
        )

    # ------------------------------------------------------------------ data

    def prompts_for_step(self, step: int) -> list[int]:
        """Problem indices of a step: epoch-wise shuffles derived from (seed, epoch) alone.

        Deriving the order from the step number (instead of iterator state) makes resume exact.
        """
        n, k = len(self.run.problems), self.cfg.data.prompts_per_step
        out: list[int] = []
        pos = step * k
        while len(out) < k:
            epoch, offset = divmod(pos, n)
            perm = np.random.default_rng([self.cfg.seed, self.cfg.data.seed, epoch]).permutation(n)
            take = min(k - len(out), n - offset)
            out.extend(int(i) for i in perm[offset : offset + take])
            pos += take
        return out

    # ------------------------------------------------------------------ one step

    def step(self, step: int) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        t0 = time.perf_counter()
        idx = self.prompts_for_step(step)
        prompts = [run.prompt_ids[i] for i in idx]
        sampling = dataclasses.replace(self.sampling, seed=_mix(cfg.seed, step))
        try:
            batch = self.rollout.generate(prompts, sampling)
        except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities: a diverged policy
            if "inf" not in str(e) and "nan" not in str(e):
                raise
            raise NonFiniteError(f"step {step}: the rollout engine's sampling probabilities are non-finite "
                                 f"({str(e).splitlines()[0]}): the policy diverged (its {self.param_dtype} forward "
                                 "overflows); lower policy.lr and start afresh (trainer.resume=never)") from e
        t_rollout = time.perf_counter() - t0

        rewards = self.rewards(batch, [run.problems[i].answer for i in idx])
        adv = group_advantages(rewards, cfg.rollout.num_generations, normalize_std=cfg.algorithm.normalize_std)

        t1 = time.perf_counter()
        mask = batch.response_mask
        old_logp = self.policy.logprobs(batch, cfg.rollout.temperature)
        ref_logp = self.ref.logprobs(batch, cfg.rollout.temperature) if self.ref is not None else None
        metrics = mismatch_metrics(old_logp, batch.rollout_logp, mask, length_buckets=cfg.mismatch.length_buckets)

        results = [self.update(batch, old_logp, ref_logp, adv) for _ in range(cfg.algorithm.updates_per_rollout)]
        t_train = time.perf_counter() - t1

        t2 = time.perf_counter()
        self.refit(step)
        t_refit = time.perf_counter() - t2

        last = results[-1]
        lengths = mask.sum(-1).float()
        metrics.update({
            "reward/mean": rewards.mean().item(),
            "reward/accuracy": (rewards > 0.5).float().mean().item(),
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "train/loss_scale": last.loss_scale,
            "train/grad_norm": last.grad_norm,
            "train/overflow_skips": float(self.state.skipped_updates),
            "train/overflow_retries": float(sum(r.metrics.get("overflow_retries", 0) for r in results)),
            "time/rollout_s": t_rollout,
            "time/train_s": t_train,
            "time/refit_s": t_refit,
            "time/step_s": time.perf_counter() - t0,
        })
        metrics.update({k: v for k, v in last.metrics.items() if k.startswith("loss/")})
        every = cfg.trainer.headroom_every
        if every and (step % every == 0 or step == cfg.trainer.max_steps - 1):
            metrics.update(self.policy.activation_headroom(batch))
        return metrics

    def rewards(self, batch: RolloutBatch, answers: list[str]) -> torch.Tensor:
        """Reward of each sample against its prompt's answer (text after decoding up to EOS)."""
        g = self.cfg.rollout.num_generations
        out = []
        for row, (ids, m) in enumerate(zip(batch.responses.tolist(), batch.response_mask.tolist(), strict=True)):
            tokens = [t for t, keep in zip(ids, m, strict=True) if keep and t != self.run.tokenizer.eos_token_id]
            text = self.run.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append(check_reward(self.run.reward(text, answers[row // g]), self.cfg.reward.name, row, row // g, text))
        return torch.tensor(out, dtype=torch.float32)

    def update(self, batch: RolloutBatch, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
               adv: torch.Tensor) -> TrainStepResult:
        """One optimizer step; an fp16 overflow retries the same batch with the backed-off scale.

        Rollouts are the expensive part of a step, so an overflowed update is not thrown away:
        the scaler has already backed off, and the same batch is tried again (bounded).
        """
        a = self.cfg.algorithm
        mask = batch.response_mask
        n_rows = mask.shape[0]
        n_tokens = max(int(mask.sum()), 1)
        n_nonempty = max(int((mask.sum(-1) > 0).sum()), 1)

        def loss_fn(logp: torch.Tensor, rows: slice) -> tuple[torch.Tensor, dict[str, float]]:
            m = mask[rows]
            loss, mets = policy_loss(
                a.name, logp, old_logp[rows], batch.rollout_logp[rows], adv[rows], m,
                correction=a.correction, clip_low=a.clip_low, clip_high=a.clip_high, is_cap=a.is_cap,
                reduction=a.reduction,
            )
            if ref_logp is not None and a.kl_coef > 0:
                kl = kl_penalty(logp, ref_logp[rows], m, kind=a.kl_kind)
                kl_mean = (kl * m).sum() / m.sum().clamp(min=1)
                loss = loss + a.kl_coef * kl_mean
                mets["kl_to_ref"] = kl_mean.item()
            # micro-batch weight so that the summed micro-batch losses equal the full-batch loss
            if a.name == "grpo" and a.reduction == "token_mean":
                w = float(m.sum()) / n_tokens
            elif a.name == "grpo" and a.reduction == "seq_mean_token_mean":  # mean over non-empty rows
                w = float((m.sum(-1) > 0).sum()) / n_nonempty
            else:
                w = (rows.stop - rows.start) / n_rows
            return loss * w, {**mets, "_w": w}  # `_w`: the micro-batch's weight for `_combine`

        retries = 0
        while True:
            result = self.policy.train_step(batch, loss_fn, self.cfg.rollout.temperature)
            check_update(result.skipped, result.metrics.get("loss", 0.0), result.grad_norm,
                         loss_scaling=self.loss_scaling, retries=retries,
                         max_retries=self.cfg.trainer.max_overflow_retries, step=self.state.step)
            if not result.skipped:
                break
            self.state.skipped_updates += 1
            retries += 1
        loss_value = result.metrics.get("loss", float("nan"))
        result.metrics.update(_combine(result.micro_metrics), **{"loss/value": loss_value})
        result.metrics["overflow_retries"] = retries
        return result

    # ------------------------------------------------------------------ checkpoints

    def refit(self, step: int) -> None:
        """Send the policy's weights to the rollout engine; never a NaN/inf (or fp16-overflowing) one."""
        state = self.policy.rollout_state_dict()
        check_weights(state, "refit", step, self.param_dtype)
        self.rollout.update_weights(state)

    def save(self, root: Path) -> Path:
        state = self.policy.state_dict()
        return ckpt.save_checkpoint(
            root, self.state.step,
            model_state=state.pop("model"),
            trainer_state=state,
            rng=ckpt.capture_rng(),
            data_state={"step": self.state.step, "skipped_updates": self.state.skipped_updates},
            meta={"recipe": self.cfg.recipe, "run": self.identity},
            keep_last=self.cfg.trainer.keep_last,
            weights_dtype=self.param_dtype,
        )

    def restore(self, path: Path, verify: bool = True) -> None:
        data = ckpt.load_checkpoint(path, verify=verify)
        try:
            check_weights(data["model_state"], f"resume from {path}", int(data["step"]))
            self.policy.load_state_dict({"model": data["model_state"], **data["trainer_state"]})
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ckpt.CheckpointError(f"checkpoint {path} does not load into this run ({first})") from e
        ckpt.restore_rng(data["rng"])
        self.state.step = int(data["data_state"]["step"])
        self.state.skipped_updates = int(data["data_state"]["skipped_updates"])
        self.refit(self.state.step)


def run(cfg: DictConfig, console: Console | None = None) -> dict[str, float]:
    """Run a recipe end to end; returns the final step's metrics (plus `run/*` summary)."""
    console = console or Console()
    rc = typed(cfg)
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
        _seed_everything(rc.seed)
        setup = build_run(rc, console=console)
        try:
            return _run(rc, setup, out, console, start.resume_from, identity)
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
    trainer = RLTrainer(rc, setup, console)
    trainer.identity = identity

    ckpt_root = out / "checkpoints"
    if resume_from is not None:
        trainer.restore(resume_from, verify=False)  # verified (checksums) by prepare_run_dir
        console.print(f"resumed from {resume_from} (step {trainer.state.step})", soft_wrap=True)
        if trainer.state.step >= rc.trainer.max_steps:
            console.print(f"nothing to train: the run in {out} is already at step {trainer.state.step} "
                          f"(trainer.max_steps={rc.trainer.max_steps}); raise trainer.max_steps to continue it, or "
                          "use another output_dir / trainer.resume=never for a new run", soft_wrap=True)
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
                if step % rc.trainer.log_every == 0 or trainer.state.step == rc.trainer.max_steps:
                    logger.log(trainer.state.step, metrics)
                bar.update(task, advance=1, metrics=_short(metrics))
                every = rc.trainer.save_every
                if (every and trainer.state.step % every == 0) or trainer.state.step == rc.trainer.max_steps:
                    trainer.save(ckpt_root)
    finally:
        logger.close()
    if rc.trainer.export_hf:
        path = ckpt.write_hf_checkpoint(setup.model_cfg, out / "hf", setup.tokenizer,
                                        state_dict=trainer.policy.rollout_state_dict(), seed=rc.seed,
                                        step=trainer.state.step)
        console.print(f"policy exported (HF, safetensors): {path}")
    metrics["run/wall_s"] = time.perf_counter() - start_time
    if rc.trainer.max_steps:
        console.print(summary_table(f"{rc.recipe}: done after {trainer.state.step} steps", _summary_rows(metrics, out)))
    return metrics


def audit(setup: RunSetup, rc: RecipeConfig) -> None:
    """Startup precision audit of both engines against their policies (refuse on any finding)."""
    resolve_policies(rc.precision.model_dump())  # undeclared trainer/rollout ablation
    for name, engine in (("trainer", setup.policy), ("rollout engine", setup.rollout)):
        problems = engine.audit()
        if problems:
            raise PrecisionMismatchError(name, problems)


def _combine(parts: list[dict[str, float]]) -> dict[str, float]:
    """Micro-batch loss metrics -> step metrics (weighted means; max for *_max, min for *_min)."""
    if not parts:
        return {}
    total = sum(p["_w"] for p in parts) or 1.0
    out: dict[str, float] = {}
    for key in parts[0]:
        if key == "_w":
            continue
        vals = [p[key] for p in parts if key in p]
        if key.endswith("_max"):
            out[f"loss/{key}"] = max(vals)
        elif key.endswith("_min"):
            out[f"loss/{key}"] = min(vals)
        else:
            out[f"loss/{key}"] = sum(p[key] * p["_w"] for p in parts if key in p) / total
    return out


def _mix(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _short(m: dict[str, float]) -> str:
    keys = (("acc", "reward/accuracy", ".2f"), ("kl", "mismatch/kl_k3", ".1e"), ("scale", "train/loss_scale", "g"))
    return "  ".join(f"{n} {m[k]:{f}}" for n, k, f in keys if k in m)


def _summary_rows(m: dict[str, float], out: Path) -> list[tuple[str, str]]:
    rows = [(k, f"{m[k]:.4g}") for k in ("reward/accuracy", "reward/mean", "mismatch/kl_k3", "mismatch/kl_k1",
                                          "mismatch/abs_logratio_max", "train/loss_scale",
                                          "train/overflow_skips", "run/wall_s") if k in m]
    rows.append(("outputs", str(out)))
    return rows
