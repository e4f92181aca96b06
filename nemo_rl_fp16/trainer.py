"""The RL loop: rollout -> reward -> advantages -> π log-probs -> loss -> step -> refit.

One story, top to bottom (`RLTrainer.step`). The loop talks to its engines only through the
`PolicyEngine` / `RolloutEngine` protocols (`interfaces.py`), so the same loop drives the torch
engines on a CPU and Megatron + vLLM on a cluster; the objective is `algorithms.PolicyLossFn`.
Every step logs reward, the π-vs-µ mismatch metrics, the loss scale and overflow skips, so a user
sees the precision story of their own run. Assembling a run is `assembly.py`'s job, driving it
(checks, lock, logging, export) the `rl` command's (`commands/rl.py`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.algorithms import LossInputs, PolicyLossFn, combine_metrics, group_advantages
from nemo_rl_fp16.config import RecipeConfig
from nemo_rl_fp16.data.reward_pool import RewardScorer
from nemo_rl_fp16.guards import NonFiniteError, check_reward, check_update, check_weights
from nemo_rl_fp16.interfaces import PolicyEngine, RolloutBatch, RolloutEngine, SamplingParams, TrainStepResult
from nemo_rl_fp16.mismatch import mismatch_metrics
from nemo_rl_fp16.runtime import capture_rng, mix_seed, restore_rng


@dataclass
class RunState:
    """What a checkpoint must hold besides the engines' own state."""

    step: int = 0
    skipped_updates: int = 0


class RunParts(Protocol):
    """What the loop needs of an assembled run (`assembly.RunSetup` is one)."""

    tokenizer: Any  # HF tokenizer: eos_token_id, decode
    problems: Sequence[Any]  # `data.Problem`s: prompt, answer
    prompt_ids: list[list[int]]  # token ids of each problem's prompt
    reward: Callable[[str, str], float]  # (response text, answer) -> reward
    policy: PolicyEngine
    rollout: RolloutEngine
    reference: PolicyEngine | None  # frozen π_ref when algorithm.kl_coef > 0


class RLTrainer:
    """Owns one `PolicyEngine`, one `RolloutEngine` and the data; runs `trainer.max_steps` steps.

    Args:
        cfg (RecipeConfig): the typed recipe.
        run (RunParts): the assembled engines and data (`assembly.build_run`).
        console: kept for callers that pass one; the loop itself prints nothing.
    """

    def __init__(self, cfg: RecipeConfig, run: RunParts, console: Any = None):
        """Take the run's engines and data; the KL term is on when the run has a reference."""
        self.cfg = cfg
        self.run = run
        self.policy: PolicyEngine = run.policy
        self.rollout: RolloutEngine = run.rollout
        self.ref: PolicyEngine | None = run.reference
        self.console = console
        self.state = RunState()
        self.loss = PolicyLossFn.from_config(cfg.algorithm, with_reference=self.ref is not None)
        self.identity: dict | None = None  # set by the `rl` command: stored with every checkpoint
        self.sampling = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            num_generations=cfg.rollout.num_generations,
            seed=cfg.seed,
            stop_token_ids=(run.tokenizer.eos_token_id,),
        )

    @property
    def loss_scaling(self) -> bool:
        """Whether π's precision scales the loss (a skipped update is an fp16 overflow only then)."""
        return self.policy.precision.loss_scale.enabled

    @property
    def param_dtype(self) -> torch.dtype:
        """π's weight dtype: refit and checkpointed weights must be finite in it."""
        return self.policy.precision.param_dtype

    # ------------------------------------------------------------------ data

    def prompts_for_step(self, step: int) -> list[int]:
        """Problem indices of a step: epoch-wise shuffles derived from (seed, epoch) alone.

        Deriving the order from the step number (instead of iterator state) makes resume exact.

        Args:
            step (int): the 0-based RL step.

        Returns:
            list[int]: `data.prompts_per_step` indices into the run's problems (epochs wrap within a step).
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
        """One RL step: sample, reward, advantages, π (and π_ref) log-probs, update(s), refit.

        Args:
            step (int): the 0-based step number (picks the prompts and the sampling seed).

        Returns:
            dict[str, float]: the step's metrics: `reward/*`, `response/*`, `mismatch/*`
            (`mismatch.mismatch_metrics`, π_old vs µ), `train/*`, `loss/*`, `time/*` (seconds)
            and, every `trainer.headroom_every` steps, the fp16 activation headroom.

        Raises:
            NonFiniteError: a non-finite logit, reward, loss, gradient or weight (`guards.py`).
        """
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
        refit_stats = self.refit(step)
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
            **refit_stats,
            "time/step_s": time.perf_counter() - t0,
        })
        metrics.update({k: v for k, v in last.metrics.items() if k.startswith("loss/")})
        every = cfg.trainer.headroom_every
        if every and (step % every == 0 or step == cfg.trainer.max_steps - 1):
            metrics.update(self.policy.activation_headroom(batch))
        return metrics

    def rewards(self, batch: RolloutBatch, answers: list[str]) -> torch.Tensor:
        """Reward of each sample against its prompt's answer (text after decoding up to EOS).

        Args:
            batch (RolloutBatch): the step's samples (`num_generations` consecutive rows per prompt).
            answers (list[str]): one reference answer per prompt.

        Returns:
            torch.Tensor: `[N]` fp32 rewards.

        Raises:
            NonFiniteError: the reward function returned a non-finite value (`guards.check_reward`).
        """
        g = self.cfg.rollout.num_generations
        texts = []
        for ids, m in zip(batch.responses.tolist(), batch.response_mask.tolist(), strict=True):
            tokens = [t for t, keep in zip(ids, m, strict=True) if keep and t != self.run.tokenizer.eos_token_id]
            texts.append(self.run.tokenizer.decode(tokens, skip_special_tokens=True))
        if getattr(self, "_scorer", None) is None:  # `reward.workers` processes (data/reward_pool.py)
            self._scorer = RewardScorer(self.cfg.reward.name, self.run.reward, self.cfg.reward.workers)
        scores = self._scorer(texts, [answers[row // g] for row in range(len(texts))])
        out = [check_reward(r, self.cfg.reward.name, row, row // g, texts[row]) for row, r in enumerate(scores)]
        return torch.tensor(out, dtype=torch.float32)

    def update(self, batch: RolloutBatch, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
               adv: torch.Tensor) -> TrainStepResult:
        """One optimizer step; an fp16 overflow retries the same batch at a strictly lower scale.

        Rollouts are the expensive part of a step, so an overflowed update is not thrown away: the
        scale backs off (now, whatever the hysteresis: `back_off_loss_scale`) and the same batch is
        tried again (at most `trainer.max_overflow_retries` times; none when the scale cannot go lower).

        Args:
            batch (RolloutBatch): the step's samples.
            old_logp (torch.Tensor): `[N, T]` fp32 log π_old.
            ref_logp (torch.Tensor | None): `[N, T]` fp32 log π_ref (None without a reference).
            adv (torch.Tensor): `[N]` fp32 advantages.

        Returns:
            TrainStepResult: the applied step; `metrics` gains `loss/*` (`combine_metrics` of the
            micro-batches) and `overflow_retries`.

        Raises:
            NonFiniteError: non-finite loss/gradients not explained by fp16 overflow, retries
                exhausted, or an overflow at the minimum loss scale.
        """
        loss_fn = self.loss.bind(LossInputs(old_logp, batch.rollout_logp, adv, batch.response_mask, ref_logp))
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

    def refit(self, step: int) -> dict[str, float]:
        """Send the policy's weights to the rollout engine; never a NaN/inf (or fp16-overflowing) one.

        A rollout group that can stream from the trainer ranks (`RayRolloutGroup.refit_from`) gets
        the weights as buckets straight from the ranks that own them (checked there, shard by
        shard, before anything is sent); otherwise the full state dict is checked and handed over.

        Args:
            step (int): the RL step (for the non-finite message).

        Returns:
            dict[str, float]: `refit/bytes` (bytes moved, rollout dtype) and `refit/mode` (the
            transport, `rollout.refit.MODE_CODES`: 0 direct, 1 shm, 2 cuda_ipc, 3 broadcast,
            4 restart, 5 ray).

        Raises:
            NonFiniteError: a weight is NaN/inf or beyond the rollout dtype's range; nothing was sent.
        """
        from nemo_rl_fp16.rollout.refit import refit_metrics

        if hasattr(self.rollout, "refit_from"):
            self.rollout.refit_from(self.policy, step)
            return refit_metrics(self.rollout, None)
        state = self.policy.rollout_state_dict()
        check_weights(state, "refit", step, self.param_dtype)
        self.rollout.update_weights(state)
        return refit_metrics(self.rollout, state)

    def save(self, root: Path) -> Path:
        """Checkpoint the engines, the RNG and the loop state under `root` (`checkpoint.save_checkpoint`).

        Args:
            root (Path): the run's `checkpoints/` folder.

        Returns:
            Path: the new checkpoint's folder (`step_XXXXXX`).
        """
        step = self.state.step
        if hasattr(self.policy, "save_sharded"):  # interfaces.ShardedCheckpointing (megatron: dist checkpoint)
            state, sharded = {"model": None}, (lambda d: self.policy.save_sharded(d, step))
        else:
            state, sharded = self.policy.state_dict(), None
        return ckpt.save_checkpoint(
            root, self.state.step,
            model_state=state.pop("model"), sharded=sharded,
            trainer_state=state,
            rng=capture_rng(),
            data_state={"step": self.state.step, "skipped_updates": self.state.skipped_updates},
            meta={"recipe": self.cfg.recipe, "run": self.identity},
            keep_last=self.cfg.trainer.keep_last,
            weights_dtype=self.param_dtype,
        )

    def restore(self, path: Path, verify: bool = True) -> None:
        """Load a checkpoint into the engines and the loop, restore the RNG, then refit µ.

        Args:
            path (Path): a checkpoint folder written by `save`.
            verify (bool): check the checksums first (False when the caller already did).

        Raises:
            CheckpointError: the checkpoint is corrupt or does not load into this run.
        """
        data = ckpt.load_checkpoint(path, verify=verify)
        try:
            if data["sharded_dir"] is not None:
                if not hasattr(self.policy, "load_sharded"):
                    raise ValueError("it is a distributed (megatron) checkpoint; resume it with policy.backend=megatron")
                self.policy.load_sharded(data["sharded_dir"])
            else:
                check_weights(data["model_state"], f"resume from {path}", int(data["step"]))
                self.policy.load_state_dict({"model": data["model_state"], **data["trainer_state"]})
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ckpt.CheckpointError(f"checkpoint {path} does not load into this run ({first})") from e
        restore_rng(data["rng"])
        self.state.step = int(data["data_state"]["step"])
        self.state.skipped_updates = int(data["data_state"]["skipped_updates"])
        self.refit(self.state.step)
