"""The two engine protocols the RL loop talks to, and the batch that flows between them.

The RL loop (`trainer.py`) talks to its engines only through these protocols: a `RolloutEngine`
(µ) samples responses and reports the log-probs of what it sampled; a `PolicyEngine` (π) scores
the same tokens and takes optimizer steps. Each engine is built from its side's
`PrecisionPolicy` (`precision/policy.py`; trainer and rollout share one preset). Implementations:
`policy.torch_policy.TorchPolicy`, `policy.megatron*` (`MegatronPolicy`),
`rollout.torch_engine.TorchRolloutEngine`, `rollout.vllm_engine.VllmRolloutEngine`, and the Ray
groups in `distributed/`, which fan each call out to actors.

Token layout of a `RolloutBatch` (one row per sample, `N = prompts * num_generations`):

    input_ids      [N, P + T] int64  left-padded prompt (width P) followed by the response (width
                                     T, right-padded with pad_token_id after EOS)
    attention_mask [N, P + T] int64  1 on real prompt and response tokens (EOS included), 0 on padding
    response_mask  [N, T]     int64  1 on real response tokens (EOS included), 0 on padding
    rollout_logp   [N, T]     fp32   log µ(token) from the distribution the engine sampled from
                                     (logits / temperature, fp32 log-softmax); 0 where masked

Response token t of row i sits at `input_ids[i, P + t]` and is predicted by the logits at
position `P + t - 1`. Position ids are `attention_mask.cumsum(-1) - 1` (clamped at 0), so a
left-padded prompt is positioned as if unpadded, identically in both engines. Log-probs are
natural-log nats; every tensor the engines return is on CPU unless a method says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from nemo_rl_fp16.precision import PrecisionPolicy


@dataclass
class RolloutBatch:
    """Sampled responses plus what the rollout engine believed about them (see module doc)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rollout_logp: torch.Tensor
    prompt_width: int
    # index of the prompt each row answers (rows of one prompt are consecutive)
    prompt_index: torch.Tensor
    # MoE only: experts the engine picked, [N, T, moe layers, top_k] int16, -1 on padding; entry t is the
    # routing at the position whose logits score response token t (`moe_routing`); None for dense models
    # and for engines that cannot record them (vLLM-CPU)
    rollout_experts: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def responses(self) -> torch.Tensor:
        """Response token ids `[N, T]` (padding included)."""
        return self.input_ids[:, self.prompt_width :]

    @property
    def num_samples(self) -> int:
        """Rows `N` of the batch."""
        return self.input_ids.shape[0]

    @classmethod
    def concat(cls, batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
        """Stack batches of consecutive prompt groups (e.g. from several rollout engines).

        Prompts are left-padded to the widest prompt and responses right-padded to the longest,
        so every row keeps the layout of the module doc; `prompt_index` continues across batches.
        Used by `distributed.ray_engines` to join the engines' shares of one step's prompts.

        Args:
            batches: batches in prompt order; one batch is returned as is (no copy).
            pad_token_id: fills the new prompt (left) and response (right) padding of `input_ids`.

        Returns:
            One batch of `sum(N_i)` rows, prompt width `max(P_i)`, response width `max(T_i)`;
            `extras` is the first batch's.

        Raises:
            ValueError: some batches carry `rollout_experts` and others do not.
        """
        if len(batches) == 1:
            return batches[0]
        p = max(b.prompt_width for b in batches)
        t = max(b.response_mask.shape[1] for b in batches)

        def pad(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (left, right), value=value) if left or right else x

        ids, attn, resp, logp, index, experts, offset = [], [], [], [], [], [], 0
        for b in batches:
            dp, dt = p - b.prompt_width, t - b.response_mask.shape[1]
            ids.append(pad(b.input_ids, dp, dt, pad_token_id))
            attn.append(pad(b.attention_mask, dp, dt, 0))
            resp.append(pad(b.response_mask, 0, dt, 0))
            logp.append(pad(b.rollout_logp, 0, dt, 0.0))
            index.append(b.prompt_index + offset)
            offset += int(b.prompt_index.max()) + 1 if b.num_samples else 0
            if b.rollout_experts is not None:
                experts.append(torch.nn.functional.pad(b.rollout_experts, (0, 0, 0, 0, 0, dt), value=-1))
        if experts and len(experts) != len(batches):
            raise ValueError("cannot concatenate batches with and without rollout_experts")
        return cls(input_ids=torch.cat(ids), attention_mask=torch.cat(attn), response_mask=torch.cat(resp),
                   rollout_logp=torch.cat(logp), prompt_width=p, prompt_index=torch.cat(index),
                   rollout_experts=torch.cat(experts) if experts else None, extras=dict(batches[0].extras))

    def select(self, rows: torch.Tensor | slice) -> RolloutBatch:
        """Rows of the batch (micro-batching, the data-parallel split); tensors are views where possible.

        Args:
            rows: a slice, or an index/bool tensor over the `N` rows.

        Returns:
            A batch of the selected rows with the same `prompt_width`; `extras` is shared, not copied.
        """
        return RolloutBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            rollout_logp=self.rollout_logp[rows],
            prompt_width=self.prompt_width,
            prompt_index=self.prompt_index[rows],
            rollout_experts=None if self.rollout_experts is None else self.rollout_experts[rows],
            extras=self.extras,
        )


@dataclass
class SamplingParams:
    """How the rollout engine samples; the trainer scores with the same temperature.

    Attributes:
        max_new_tokens: response tokens per row at most (EOS included); a row that reaches it
            is truncated (`RolloutBatch.extras["truncated"]`).
        temperature: logits are divided by it before the softmax; 0 means greedy (scored at 1).
        top_p: nucleus mass in (0, 1]; the vLLM engine accepts 1 only (`docs/vllm.md`).
        num_generations: samples per prompt (the GRPO group size); rows of one prompt are consecutive.
        seed: the step's sampling seed (`runtime.mix_seed(seed, step)` in the loop).
        stop_token_ids: ids that end a row besides the engine's EOS ids.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    num_generations: int = 1
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class TrainStepResult:
    """Outcome of one optimizer step attempt (`PolicyEngine.train_step`).

    Attributes:
        skipped: True when fp16 gradients overflowed: weights and optimizer state untouched,
            the loss scale backed off (per hysteresis).
        grad_norm: fp32 L2 norm of the unscaled gradients before clipping; nan when skipped.
        loss_scale: the scale this attempt multiplied the loss by (1.0 without loss scaling).
        metrics: `loss` (sum of the micro-batch contributions), the loss closure's metrics
            weighted by rows, `loss_scale`, `skipped` (0/1).
        micro_metrics: each micro-batch's metrics dict as the loss closure returned it, all
            data-parallel ranks, in rank order (the loop combines them with the declared
            denominators: `algorithms.combine_metrics`).
    """

    skipped: bool  # True when fp16 gradients overflowed: weights untouched, scale backed off
    grad_norm: float  # fp32 norm of the unscaled gradients before clipping (inf/nan if skipped)
    loss_scale: float  # the scale used for this attempt
    metrics: dict[str, float] = field(default_factory=dict)
    # each micro-batch's metrics dict as the loss closure returned it (all data-parallel ranks)
    micro_metrics: list[dict[str, float]] = field(default_factory=list)


# The loss an engine calls per micro-batch: given π log-probs [n, T] (fp32, with grad) for rows
# `rows` of the batch, return (loss contribution, metrics). The contribution is already the rows'
# exact share of the whole batch's loss (normalised by the global valid tokens / sequences):
# engines sum the micro-batches' and data-parallel ranks' gradients and never reweight them, and
# hand each micro-batch's metrics back in `TrainStepResult.micro_metrics`. The loop passes
# `algorithms.BoundLoss` (`PolicyLossFn.bind`: NeMo-RL's loss interface with global normalisers,
# each metric's denominator declared by `PolicyLossFn.metric_denominators`); any callable with
# this signature works (tests pass plain functions). `rows` is a slice, or int64 row indices under
# sequence packing (`policy.packing`: a rank's rows sorted by length): index per-row data with it.
LossFn = Callable[[torch.Tensor, slice | torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses in the rollout precision (µ) and refits weights from the policy engine.

    The loop calls `generate` once per step, then `update_weights` after the optimizer step(s)
    (the refit), and `audit` at start-up (`trainer.audit`), where any finding stops the run with
    `PrecisionMismatchError`.

    Attributes:
        precision: the rollout side's `PrecisionPolicy` (`param_dtype`, `kv_cache_dtype`,
            `logits_dtype`), the same preset as the policy engine's.
    """

    precision: PrecisionPolicy

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.num_generations` responses per prompt.

        Args:
            prompts: token ids of each prompt, unpadded, none empty.
            params: sampling settings; `params.seed` makes the result reproducible (same seed,
                prompts and engine configuration: the same tokens).

        Returns:
            A CPU `RolloutBatch` in the module doc's layout: rows of one prompt consecutive
            (`prompt_index`), `rollout_logp` the fp32 log µ of each sampled token before top-p
            truncation, `extras["truncated"]` `[N]` bool (hit `max_new_tokens` before EOS), and
            `rollout_experts` for MoE models on engines that record them (torch engine).

        Raises:
            ValueError: no prompt, an empty prompt, or bad `params` (sizes < 1, `top_p` outside
                (0, 1], negative temperature; vLLM: `top_p < 1`).
            guards.NonFiniteError: the model produced NaN/inf logits (torch engine), i.e. a
                diverged policy; nothing is sampled from them.
        """
        ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Refit the engine's weights (the step after `PolicyEngine.rollout_state_dict`).

        Args:
            state_dict: fp32 master weights under HF names (`PolicyEngine.rollout_state_dict`);
                the engine casts them to `precision.param_dtype` (rounded once, from fp32).

        Raises:
            ValueError: names or shapes differ from the engine's model; nothing is loaded
                (all-or-nothing).
        """
        ...

    def audit(self) -> list[str]:
        """Compare the live engine's dtypes with `precision`.

        Returns:
            One line per finding (`"<component>: found X, expected Y (field)"`: parameters,
            buffers, KV cache, and for vLLM its configured model/cache dtype); empty when the
            engine matches its policy.
        """
        ...


@runtime_checkable
class PolicyEngine(Protocol):
    """Holds π: fp32 master weights, optimizer and loss scaler; scores tokens and takes steps.

    Call order in one RL step (`trainer.RLTrainer.step`): `logprobs` (π_old, and the frozen
    reference's for KL), `selected_experts` (MoE batches only), `train_step` once per
    `algorithm.updates_per_rollout` (with `back_off_loss_scale` + another `train_step` after an
    fp16 overflow), `rollout_state_dict` for the refit, `activation_headroom` every
    `trainer.headroom_every` steps; `state_dict` / `load_state_dict` at checkpoints and resume;
    `audit` at start-up. Under data parallelism every rank receives the whole batch, works on its
    slice of the rows and returns full-batch results.

    Attributes:
        precision: the trainer side's `PrecisionPolicy` (`param_dtype` of the compute copy,
            `master_dtype` fp32, `grad_reduce_dtype`, `logits_dtype`, `loss_scale`).
    """

    precision: PrecisionPolicy

    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """Score the batch's response tokens under π, without gradients.

        The same quantity as `RolloutBatch.rollout_logp`: `log_softmax(logits / temperature)` in
        `precision.logits_dtype` (fp32) at position `P + t - 1`, gathered at token t (temperature
        0 scored at 1; `modeling.logprobs`). Megatron: vocab-parallel, no gathered logits.

        Args:
            batch: the rollout's batch (module doc layout).
            temperature: the rollout's sampling temperature.

        Returns:
            `[N, T]` fp32 log π, 0 where `response_mask` is 0, on the batch's device.

        Raises:
            ValueError: a batch that does not split evenly over the data-parallel ranks; under
                `policy.router_replay=rollout`, a batch without `rollout_experts`.
        """
        ...

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
        """One optimizer step attempt over the whole batch, micro-batched.

        For each micro-batch of `policy.micro_batch_size` rows: score with gradients, call
        `loss_fn(logp, rows)`, backpropagate `loss * loss_scale` through the compute copy;
        gradients accumulate in `grad_reduce_dtype` (fp32) and are summed over micro-batches and
        data-parallel ranks. Then unscale into the fp32 master grads and either skip (any inf/nan:
        weights and optimizer state untouched, scale backed off per hysteresis) or clip to
        `policy.max_grad_norm` and step AdamW. Mixed-precision recipe of arXiv 2510.26788 /
        megatron-core's `MixedPrecisionOptimizer`.

        Args:
            batch: the rollout's batch.
            loss_fn: the loss closure (`LossFn`) of this update.
            temperature: the rollout's sampling temperature.

        Returns:
            The attempt's `TrainStepResult`; the caller retries on `skipped`.

        Raises:
            ValueError: as `logprobs`.
            NotImplementedError: megatron on CPU with more than one process.
        """
        ...

    def back_off_loss_scale(self, used_scale: float) -> bool:
        """Lower the loss scale strictly below `used_scale` before the loop retries the same batch.

        The scaler's own update may have kept the scale (hysteresis > 1); a retry at the same
        scale would overflow again. Same rule as `DynamicLossScaler.back_off_below` (megatron's
        `DynamicGradScaler` on CUDA): `max(used_scale * backoff_factor, min_scale)`.

        Args:
            used_scale: the overflowed attempt's `TrainStepResult.loss_scale`.

        Returns:
            True when the scale is now below `used_scale`; False when it cannot go lower (no
            scaler: bf16/fp32, scaling disabled; or already at `min_scale`).
        """
        ...

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the rollout engine refits from.

        Returns:
            fp32 master weights under HF names (megatron: TP/EP shards gathered and converted;
            LoRA: the adapters merged into the base weights), detached, on the engine's device
            or CPU. Live references: clone before mutating.
        """
        ...

    def selected_experts(self, batch: RolloutBatch) -> torch.Tensor:
        """Experts the policy's own routers pick for the response tokens (MoE), before any replay.

        Called only for batches that carry `rollout_experts`; compared with them for
        `mismatch/router_topk_flip_rate` (`modeling.moe_routing`).

        Args:
            batch: the rollout's batch.

        Returns:
            `[N, T, moe layers, top_k]` expert ids (torch: int16 in the router's top-k order, -1 on
            padding; megatron: int64, sorted, padding rows not masked), entry t
            the routing at the position that scores response token t, aligned with
            `RolloutBatch.rollout_experts`.

        Raises:
            ValueError: a dense model.
        """
        ...

    def activation_headroom(self, batch: RolloutBatch) -> dict[str, float]:
        """The fp16 range monitor over one no-grad forward of `batch` (`precision.range_monitor`).

        Args:
            batch: the rollout's batch; every position counts, padding included.

        Returns:
            `range/act_absmax` (max |hidden state| over decoder layers), `range/act_absmax/layer{i}`,
            `range/fp16_headroom` (65504 / absmax, a ratio; 0 when any value is non-finite) and
            `range/act_nonfinite` (count of non-finite values); empty when the batch has no rows.
            Names in `docs/metrics.md`.
        """
        ...

    def audit(self) -> list[str]:
        """Compare the engine's live dtypes with `precision`.

        Returns:
            One line per finding: compute-copy parameters vs `param_dtype` (routers vs
            `router_dtype`), master weights and optimizer state vs `master_dtype` (fp32); empty
            when everything matches.
        """
        ...

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to resume this engine.

        Returns:
            `{"model": fp32 master weights (HF names; LoRA: peft names), "optimizer": the
            optimizer's state dict, "scaler": DynamicLossScaler state or None}`; live
            references, like torch's. FSDP: full (unsharded) state on rank 0, empty elsewhere.
        """
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore weights, optimizer state and loss scale from a `state_dict()`.

        Args:
            state: a dict as `state_dict` returns it (from `checkpoint.load_checkpoint`).

        Raises:
            ValueError: the checkpoint and the engine disagree on loss scaling, or the weights'
                names/shapes differ (nothing copied).
            NotImplementedError: the megatron engine on CUDA (its checkpoints are distributed:
                `ShardedCheckpointing`, which the loop uses when the engine has it).
        """
        ...


@runtime_checkable
class ShardedCheckpointing(Protocol):
    """Optional for a `PolicyEngine`: checkpoints as one distributed (per-rank sharded) folder.

    When the engine has these methods, the loop's save (`trainer.RLTrainer.save`) calls
    `save_sharded` instead of `state_dict` and the step folder holds `dist/` instead of
    `model.safetensors` (`checkpoint.save_checkpoint(sharded=...)`: written inside the temp step
    folder, every file checksummed in meta.json, then renamed in atomically); resume calls
    `load_sharded` on the verified `dist/`. The loop's own state (step counters, data order,
    host RNG) and the run fingerprint stay in `trainer_state.pt` / meta.json as for any engine.
    The megatron engine implements it with megatron-core `dist_checkpointing`
    (`policy/megatron/checkpointing.py`).
    """

    def save_sharded(self, directory: Path, step: int | None = None) -> None:
        """Write model, optimizer (fp32 master / main params), loss scale and RNG into `directory`.

        A collective over all ranks; `directory` exists, is empty and is on a filesystem every rank sees.

        Args:
            directory: the folder to write into.
            step: the RL step (for messages).

        Raises:
            NonFiniteError: a master weight is NaN/inf; nothing is written.
        """
        ...

    def load_sharded(self, directory: Path) -> dict:
        """Restore what `save_sharded` wrote, into this engine's (possibly different) parallel layout.

        Args:
            directory: a folder `save_sharded` wrote.

        Returns:
            A record of the writer (e.g. its layout) and what was restored.

        Raises:
            ValueError: one line naming both layouts when the checkpoint cannot load into this one.
        """
        ...
