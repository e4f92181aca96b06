"""`MasterWeights`: the fp32 master step with dynamic loss scaling, shared by composition.

Used wherever megatron's own optimizer does not run: the torch backend always, the megatron
backend on CPU.

Layout (what FSDP's `MixedPrecisionPolicy(param_dtype=...)` and Megatron's fp16 optimizer do,
deliberately *not* autocast): an fp32 master model owns the parameters and the optimizer state; a
compute copy in `precision.param_dtype` runs forward and backward. Each step casts master ->
compute (`sync_compute`, lazily, once per optimizer step), backpropagates `loss * scale` through
the compute copy micro-batch by micro-batch (`micro_batches.MicroBatchLoop.forward_backward`),
accumulates each micro-batch's low-precision gradients in `grad_reduce_dtype` (fp32, as FSDP's
`reduce_dtype` and Megatron's main_grad do), unscales them into fp32 master `.grad` (dividing in
fp32), and either skips the step (any inf/nan: weights and optimizer state untouched, loss scale
backed off per hysteresis, `DynamicLossScaler`) or clips and steps. When the compute copy *is*
the master (fp32 compute, or FSDP, which casts and reduces itself) gradients accumulate in `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, TrainStepResult
from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop
from nemo_rl_fp16.precision import DynamicLossScaler, PrecisionPolicy, dtype_name

#: Test/debug hook applied to the fp32 master grads before the inf check (e.g. plant an inf).
GradHook = Callable[[list[torch.Tensor]], None]


class GradSync(Protocol):
    """A backend's multi-process gradient reduction (e.g. `policy.megatron.grad_sync.CpuGradSync`)."""

    def reduce(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Sum the accumulated (still scaled) gradients of the compute parameters over ranks.

        Args:
            params: the compute copy's trainable parameters.
            grads: their accumulated gradients in `grad_reduce_dtype` (None: no gradient on this rank).

        Returns:
            The reduced gradients, one per parameter.
        """

    def grad_norm(self, params: list[torch.nn.Parameter]) -> float:
        """The global L2 norm of the master parameters' `.grad`.

        Args:
            params: the fp32 master parameters.

        Returns:
            The norm, the same on every rank.
        """

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the master `.grad`s in place to the global norm `max_norm`.

        Args:
            params: the fp32 master parameters.
            max_norm: the largest global L2 norm kept.

        Returns:
            The global norm before clipping.
        """


class MasterWeights:
    """fp32 master weights, their compute copy, the optimizer and the dynamic loss scaler.

    Args:
        master: the fp32 master model (parameters in `precision.master_dtype`).
        compute: the compute copy in `precision.param_dtype`, or `master` itself (fp32 / FSDP).
        optimizer: steps the master's trainable parameters (built by the backend: its parameter groups).
        precision: the policy-side precision (its `loss_scale` builds the scaler).
        max_grad_norm: clip the fp32 master grads to this total norm (`<= 0`: no clipping).
        grad_sync: sums the gradients over ranks and computes the global norm (the megatron
            backend on CPU with more than one process); None: gradients are local or reduced by
            FSDP (which averages over data-parallel ranks: the unscale multiplies back).

    Raises:
        ValueError: `precision.master_dtype` is not float32.
    """

    def __init__(self, master: torch.nn.Module, compute: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 precision: PrecisionPolicy, *, max_grad_norm: float, grad_sync: GradSync | None = None):
        check_master_dtype(precision)
        self.grad_sync = grad_sync
        self.master = master
        self.compute = compute
        self.optimizer = optimizer
        self.precision = precision
        self.max_grad_norm = float(max_grad_norm)
        ls = precision.loss_scale
        self.scaler: DynamicLossScaler | None = DynamicLossScaler.from_config(ls) if ls.enabled else None
        self._stale = True
        self._master_params = list(master.parameters())
        self._compute_params = list(compute.parameters())
        self._acc: list[torch.Tensor | None] = [None] * len(self._compute_params)  # grad accumulators

    def sync_compute(self) -> None:
        """Cast master -> compute copy if the master changed since the last cast (no-op when shared)."""
        if self._stale and self.compute is not self.master:
            with torch.no_grad():
                for pc, pm in zip(self._compute_params, self._master_params, strict=True):
                    pc.copy_(pm)
        self._stale = False

    def mark_stale(self) -> None:
        """The master changed outside a step (a checkpoint load): recast before the next forward."""
        self._stale = True

    def train_step(self, loop: MicroBatchLoop, batch: RolloutBatch, loss_fn: LossFn, temperature: float,
                   grad_hook: GradHook | None = None) -> TrainStepResult:
        """One optimizer step over `batch` (micro-batched by `loop`; the skip rules: module doc).

        Args:
            loop: the backend's micro-batch loop (scores through the compute copy).
            batch: the whole batch; each data-parallel rank trains its rows.
            loss_fn: the loop's loss closure (`interfaces.LossFn`).
            temperature: as `ModelAdapter.score`.
            grad_hook: applied to the unscaled fp32 master grads before the inf check.

        Returns:
            `TrainStepResult` with `metrics` = {"loss", the closure's row-weighted metrics,
            "loss_scale", "skipped"}; `grad_norm` is the fp32 norm before clipping (nan if skipped).
        """
        self.sync_compute()
        self.compute.zero_grad(set_to_none=True)
        self.master.zero_grad(set_to_none=True)
        self._acc = [None] * len(self._compute_params)
        scale = self.scaler.scale if self.scaler is not None else 1.0

        def backward(loss: torch.Tensor) -> None:
            (loss * scale).backward()
            self._accumulate_grads()

        loss_sum, metric_sums, micro = loop.forward_backward(batch, loss_fn, temperature, backward)

        if self.grad_sync is not None:  # summed over DP (and TP where partial): unscale by scale alone
            self._reduce_pending()
            grads = self._unscale_into_master(scale)
        else:
            # FSDP averages over the data-parallel ranks (in fp32); the rows are pre-weighted by their share of
            # the global batch, so the step needs the sum: unscale by scale / world (exact for powers of two)
            grads = self._unscale_into_master(scale / loop.adapter.data_parallel().size)
        if grad_hook is not None:
            grad_hook(grads)
        found_inf = any_nonfinite(grads)
        if found_inf:
            grad_norm = float("nan")
        elif self.grad_sync is not None:
            grad_norm = (self.grad_sync.clip(self._master_params, self.max_grad_norm) if self.max_grad_norm > 0
                         else self.grad_sync.grad_norm(self._master_params))
        elif self.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._master_params, self.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        return self._finish_step(found_inf, grad_norm, scale, loss_sum, metric_sums, micro)

    def _finish_step(self, found_inf: bool, grad_norm: float, scale: float, loss_sum: float,
                     metric_sums: dict[str, float], micro: list[dict[str, float]]) -> TrainStepResult:
        """The end of every train step (also `PipelineMasterWeights.train_step`'s).

        The optimizer steps unless an overflow skips it, grads are cleared, the loss scale is updated.
        """
        if not found_inf:
            self.optimizer.step()
            self._stale = True
        self.master.zero_grad(set_to_none=True)
        self.compute.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update(found_inf)

        metrics = {"loss": loss_sum, **metric_sums, "loss_scale": scale, "skipped": float(found_inf)}
        return TrainStepResult(skipped=found_inf, grad_norm=grad_norm, loss_scale=scale, metrics=metrics,
                               micro_metrics=micro)

    def back_off_loss_scale(self, used_scale: float) -> bool:
        """Lower the scale strictly below `used_scale` for a retry (`DynamicLossScaler.back_off_below`).

        Args:
            used_scale (float): the loss scale of the overflowing step.

        Returns:
            False without a scaler or at `min_scale` (a retry would run at the same scale).
        """
        return self.scaler is not None and self.scaler.back_off_below(used_scale)

    def audit(self) -> list[str]:
        """Dtype findings on the master weights and the optimizer state (both must be `master_dtype`).

        Returns:
            One line per finding (empty: clean), e.g. `<master weights>: found float16, expected float32`.
        """
        want = self.precision.master_dtype
        lines = []
        bad_master = sorted({dtype_name(p.dtype) for p in self._master_params if p.dtype != want})
        if bad_master:
            lines.append(f"<master weights>: found {', '.join(bad_master)}, expected {dtype_name(want)} (master_dtype)")
        bad_state = sorted({f"{k} {dtype_name(v.dtype)}" for st in self.optimizer.state.values() for k, v in st.items()
                            if torch.is_tensor(v) and v.is_floating_point() and k != "step" and v.dtype != want})
        if bad_state:
            lines.append(f"<optimizer state>: found {', '.join(bad_state)}, expected {dtype_name(want)} (master_dtype)")
        return lines

    def scaler_state(self) -> dict | None:
        """The loss scaler's state dict (None when loss scaling is off).

        Returns:
            dict | None: `DynamicLossScaler.state_dict()`, or None without loss scaling.
        """
        return None if self.scaler is None else self.scaler.state_dict()

    def check_scaler_state(self, state: dict) -> None:
        """Validate a checkpoint's `"scaler"` entry against this step's loss scaling, before any copy.

        Args:
            state (dict): a policy checkpoint state (`{"model", "optimizer", "scaler"}`).

        Raises:
            ValueError: the checkpoint has a scaler and this run does not, or the reverse.
        """
        if (state.get("scaler") is None) != (self.scaler is None):
            raise ValueError("checkpoint and trainer disagree on loss scaling (precision.loss_scale.enabled)")

    def load_scaler_state(self, state: dict) -> None:
        """Restore the loss scale from a checkpoint's `"scaler"` entry and recast the compute copy.

        Args:
            state (dict): a policy checkpoint state, checked by `check_scaler_state` first.
        """
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._stale = True

    def _accumulate_grads(self) -> None:
        """Move the compute copy's micro-batch grads into accumulators in `grad_reduce_dtype`."""
        if self.compute is self.master:
            return  # fp32, or FSDP (which reduces in reduce_dtype itself): .grad accumulates
        for i, pc in enumerate(self._compute_params):
            if pc.grad is not None:
                g = pc.grad.to(self.precision.grad_reduce_dtype, copy=True)
                self._acc[i] = g if self._acc[i] is None else self._acc[i].add_(g)
                pc.grad = None

    def _reduce_pending(self) -> None:
        """Hand the accumulated grads (`.grad` when the compute copy is the master) to `grad_sync`."""
        params = [p for p in self._compute_params if p.requires_grad]
        index = [i for i, p in enumerate(self._compute_params) if p.requires_grad]
        shared = self.compute is self.master
        pending = [p.grad if shared else self._acc[i] for i, p in zip(index, params, strict=True)]
        for i, p, g in zip(index, params, self.grad_sync.reduce(params, pending), strict=True):
            if shared:
                p.grad = g
            else:
                self._acc[i] = g

    def _unscale_into_master(self, scale: float) -> list[torch.Tensor]:
        """fp32 master grads = accumulated grads (upcast) / scale, divided in fp32."""
        grads = []
        for i, pm in enumerate(self._master_params):
            if self.compute is not self.master:
                acc, self._acc[i] = self._acc[i], None
                pm.grad = None if acc is None else acc.to(pm.dtype)
            if pm.grad is None:
                continue
            if scale != 1.0:
                pm.grad.div_(scale)
            grads.append(pm.grad)
        return grads


def check_master_dtype(precision: PrecisionPolicy) -> None:
    """Refuse a policy whose master weights are not fp32.

    Args:
        precision (PrecisionPolicy): the trainer side's policy.

    Raises:
        ValueError: `precision.master_dtype` is not float32 (names the dtype found).
    """
    if precision.master_dtype != torch.float32:
        raise ValueError(f"master weights must be float32, policy has {dtype_name(precision.master_dtype)}")


def any_nonfinite(grads: list[torch.Tensor]) -> bool:
    """Whether any gradient holds inf/nan (one host sync; all-reduced under torch.distributed).

    Args:
        grads: local tensors or DTensors (their local shards are checked).

    Returns:
        True if any element of any gradient on any rank is inf or nan.
    """
    if not grads:
        return False
    flags = torch.stack([(~torch.isfinite(_local(g))).any() for g in grads]).any().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags.item())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
