"""megatron-core's mixed-precision optimizer: the megatron backend's fp32 master step on CUDA.

The CPU path uses the shared `policy.mixed_precision.MasterWeights`. On CUDA megatron-core does
the same job itself: `DistributedDataParallel` (fp32 grad buffers) and `get_megatron_optimizer`
(fp32 main params, `DynamicGradScaler` for fp16, optional distributed optimizer), configured here
from the run's `PrecisionPolicy`; `megatron_train_step` runs one step through the shared
micro-batch loop, and `back_off_grad_scalers` applies `DynamicLossScaler.back_off_below`'s rule to
megatron's scalers (the trainer's overflow retry).
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, TrainStepResult
from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop
from nemo_rl_fp16.policy.mixed_precision import GradHook
from nemo_rl_fp16.precision import PrecisionPolicy


def build_megatron_optimizer(tconfig: Any, model: torch.nn.Module, precision: PrecisionPolicy, *, lr: float,
                             weight_decay: float, max_grad_norm: float,
                             use_distributed_optimizer: bool) -> tuple[Any, Any]:
    """megatron-core's DDP wrapper and optimizer for `model`, in `precision`'s dtypes and loss scaling.

    Args:
        tconfig: the model's megatron-core `TransformerConfig`.
        model (torch.nn.Module): the `GPTModel` (wrapped in `Float16Module` for fp16/bf16), on CUDA.
        precision (PrecisionPolicy): the trainer side's policy: `param_dtype` (fp16/bf16 flags),
            `grad_reduce_dtype` (fp32 grad buffers when fp32), `loss_scale` (initial/min scale,
            growth interval, hysteresis; disabled fp16 scaling = a constant scale of 1).
        lr (float): Adam's learning rate.
        weight_decay (float): Adam's weight decay.
        max_grad_norm (float): gradient clipping norm (`clip_grad`).
        use_distributed_optimizer (bool): shard the optimizer state over the data-parallel ranks.

    Returns:
        tuple[Any, Any]: megatron-core's `DistributedDataParallel` around `model`, and the optimizer
        `get_megatron_optimizer` builds over it (fp32 main params; a `DynamicGradScaler` for fp16).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    pol = precision
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=pol.grad_reduce_dtype == torch.float32,
                                            overlap_grad_reduce=False,
                                            use_distributed_optimizer=use_distributed_optimizer)
    ddp = DistributedDataParallel(tconfig, ddp_cfg, model)
    ls = pol.loss_scale
    fp16 = pol.param_dtype == torch.float16
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, fp16=fp16, bf16=pol.param_dtype == torch.bfloat16,
        params_dtype=pol.param_dtype, clip_grad=max_grad_norm,
        # fp16: None = megatron's DynamicGradScaler; 1.0 = constant (scaling disabled). bf16/fp32: no scaler.
        loss_scale=1.0 if (fp16 and not ls.enabled) else None,
        initial_loss_scale=ls.initial_scale, min_loss_scale=ls.min_scale,
        loss_scale_window=ls.growth_interval, hysteresis=ls.hysteresis,
        use_distributed_optimizer=use_distributed_optimizer)
    return ddp, get_megatron_optimizer(opt_cfg, [ddp])


def megatron_train_step(ddp: Any, optimizer: Any, loop: MicroBatchLoop, compute: torch.nn.Module,
                        batch: RolloutBatch, loss_fn: LossFn, temperature: float, device: torch.device,
                        grad_hook: GradHook | None = None) -> TrainStepResult:
    """One optimizer step with megatron-core's optimizer: scaled backward per micro-batch, then `step`.

    Args:
        ddp: megatron-core's `DistributedDataParallel` (its grad buffers are zeroed, then reduced by
            megatron-core's `finalize_model_grads`: DP, and over TP the partial grads of replicated weights).
        optimizer: megatron-core's optimizer over `ddp` (loss scale, unscale, clip, skip on inf/nan).
        loop (MicroBatchLoop): the shared micro-batch loop over the model adapter.
        compute (torch.nn.Module): the model `loop` runs (train mode during the step).
        batch (RolloutBatch): the rollout batch; each data-parallel rank trains its rows.
        loss_fn (LossFn): the update's loss (`interfaces.LossFn`).
        temperature (float): the sampling temperature the logits are divided by.
        device (torch.device): where the loss is moved before scaling.
        grad_hook (GradHook | None): called with the fp32 main grads before the step (tests plant an inf).

    Returns:
        TrainStepResult: loss, grad norm (NaN when skipped), the loss scale used, `skipped` on an
        fp16 overflow (megatron's optimizer leaves the weights untouched and backs its scaler off).
    """
    from megatron.core.distributed import finalize_model_grads

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    scale = float(optimizer.get_loss_scale())
    compute.train()
    loss_sum, metric_sums, micro = loop.forward_backward(
        batch, loss_fn, temperature, lambda loss: optimizer.scale_loss(loss.to(device)).backward())
    # DP reduction and the TP sums of sequence-parallel / q-k norm / router grads (finish_grad_sync alone
    # leaves those partial: replicated weights would drift apart across TP ranks)
    finalize_model_grads([ddp])
    if grad_hook is not None:  # test/debug hook on the fp32 main grads (e.g. plant an inf)
        grad_hook([p.main_grad for p in ddp.parameters() if getattr(p, "main_grad", None) is not None])
    ok, grad_norm, _ = optimizer.step()
    compute.eval()
    skipped = not ok
    grad_norm = float("nan") if skipped or grad_norm is None else float(grad_norm)
    metrics = {"loss": loss_sum, **metric_sums, "loss_scale": scale, "skipped": float(skipped)}
    return TrainStepResult(skipped=skipped, grad_norm=grad_norm, loss_scale=scale, metrics=metrics,
                           micro_metrics=micro)


def back_off_grad_scalers(optimizer: Any, used_scale: float) -> bool:
    """Lower every `DynamicGradScaler` of `optimizer` strictly below `used_scale` (a retry on the same batch).

    The rule of `DynamicLossScaler.back_off_below`: `max(used_scale * backoff_factor, min_scale)`,
    hysteresis reset; a scaler already below `used_scale` is left as it is.

    Args:
        optimizer: megatron-core's optimizer (a `ChainedOptimizer`'s parts are each backed off).
        used_scale (float): the loss scale of the overflowing step.

    Returns:
        bool: False without a dynamic scaler (bf16/fp32, a constant scale) or when the scale cannot
        go below `used_scale` (at `min_scale`); True when every scaler is now below it.
    """
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    scalers = {id(o.grad_scaler): o.grad_scaler for o in opts if getattr(o, "grad_scaler", None) is not None}
    if not scalers or not all(isinstance(gs, DynamicGradScaler) for gs in scalers.values()):
        return False  # bf16/fp32 or a constant scale: a retry would run at the same scale
    for gs in scalers.values():  # the same rule as DynamicLossScaler.back_off_below
        if float(gs.scale) < used_scale:
            continue
        lower = max(float(used_scale) * float(gs.backoff_factor), float(gs.min_scale))
        if not lower < used_scale:
            return False
        gs._scale = torch.full_like(gs._scale, lower)
        gs._hysteresis_tracker = 0
    return True
