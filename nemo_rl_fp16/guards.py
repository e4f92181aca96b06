"""Non-finite guards: a NaN/inf never reaches a checkpoint, a refit, an HF export or a reward sum.

An fp16 gradient overflow is expected and handled (loss scaler backs off, the batch is retried);
every other non-finite value is a bug or a diverged run, and the run stops with one line naming
where it came from, before anything is saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class NonFiniteError(RuntimeError):
    """A non-finite value where none may be (reward, loss, gradient, weight); one-line message."""


def nonfinite_tensors(state: Mapping[str, torch.Tensor], max_abs: float | None = None) -> list[str]:
    """Names of the floating tensors of `state` holding NaN/inf (or |x| > `max_abs`), in order.

    One device sync for the whole dict (per-tensor flags are stacked first).

    Args:
        state: name -> tensor (any device; floating tensors are checked, others and empty ones
            skipped).
        max_abs: also flag values whose magnitude exceeds it (e.g. 65504: not representable in
            float16, so the fp16 engine would see inf).

    Returns:
        The flagged names, in `state`'s order; empty when every tensor is finite (and in range).
    """
    names, flags = [], []
    for name, t in state.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            continue
        t = t.detach()
        bad = ~torch.isfinite(t).all()
        if max_abs is not None:
            bad = bad | (t.abs().amax() > max_abs)
        names.append(name)
        flags.append(bad.reshape(()).to("cpu", non_blocking=False) if t.device.type != "cpu" else bad.reshape(()))
    if not flags:
        return []
    hit = torch.stack(flags).tolist()
    return [n for n, h in zip(names, hit, strict=True) if h]


def check_weights(state: Mapping[str, torch.Tensor], what: str, step: int | None,
                  dtype: torch.dtype | None = None) -> None:
    """Raise `NonFiniteError` if a weight is NaN/inf (or overflows `dtype`, e.g. float16).

    Args:
        state: the weights about to be saved / refit / exported (name -> tensor).
        what: what is about to happen, for the message ("checkpoint", "refit", "HF export").
        step: the RL step (None: not in a run).
        dtype: the dtype the weights will be used in; values beyond its finite range count as inf.

    Raises:
        NonFiniteError: naming how many tensors and a few of their names; nothing was written.
    """
    max_abs = torch.finfo(dtype).max if dtype is not None and dtype.is_floating_point else None
    bad = nonfinite_tensors(state, max_abs)
    if bad:
        at = f"at step {step}" if step is not None else ""
        kind = f"non-finite (or beyond {dtype} range)" if max_abs is not None and dtype != torch.float32 else "non-finite"
        raise NonFiniteError(
            f"{what} refused {at}: {len(bad)} weight tensor(s) are {kind}, e.g. {', '.join(bad[:3])}; "
            "the policy diverged (lower policy.lr, check the data); nothing was written"
        )


def check_reward(value: float, reward_name: str, sample: int, prompt: int, text: str) -> float:
    """Check one reward value before it enters the advantages.

    Args:
        value: what the reward function returned.
        reward_name: the `reward.name` key, for the message.
        sample: the row of the batch.
        prompt: the prompt index of the row.
        text: the decoded response (shown up to 80 characters).

    Returns:
        `value` as a float.

    Raises:
        NonFiniteError: `value` is NaN or inf.
    """
    v = float(value)
    if not math.isfinite(v):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise NonFiniteError(
            f"reward '{reward_name}' returned {v} for sample {sample} (prompt {prompt}, response {shown!r}); "
            "a reward must be a finite number: fix the reward function"
        )
    return v


def check_update(skipped: bool, loss: float, grad_norm: float, *, loss_scaling: bool, retries: int,
                 max_retries: int, step: int) -> None:
    """Stop on a non-finite loss/gradient that is not an fp16 overflow the scaler is handling.

    With loss scaling on, a skipped update is an overflow: retried until `max_retries`, then an
    error. Without it (bf16/fp32), any non-finite gradient or loss is an error at once.

    Args:
        skipped: `TrainStepResult.skipped`.
        loss: the step's loss value.
        grad_norm: `TrainStepResult.grad_norm`.
        loss_scaling: whether dynamic loss scaling is on.
        retries: overflow retries already spent on this batch.
        max_retries: `trainer.max_overflow_retries`.
        step: the RL step, for the message.

    Raises:
        NonFiniteError: a non-finite loss or gradient without loss scaling, an overflow that
            persists past `max_retries`, or a non-finite loss with finite gradients.
    """
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if not skipped and finite:
        return
    what = f"loss {loss:g}, grad norm {grad_norm:g}"
    if not loss_scaling:
        raise NonFiniteError(
            f"step {step}: non-finite {what} without loss scaling (not an fp16 overflow); the run stops before "
            "anything is saved (lower policy.lr, check rewards and data)"
        )
    if skipped and retries >= max_retries:
        raise NonFiniteError(
            f"step {step}: fp16 overflow persisted over {retries + 1} attempts ({what}); the run stops before "
            "anything is saved (raise trainer.max_overflow_retries, lower policy.lr, or lower "
            "precision.loss_scale.initial_scale)"
        )
    if not skipped:  # finite grads but non-finite loss value: not something a scaler fixes
        raise NonFiniteError(f"step {step}: non-finite {what}; the run stops before anything is saved")
