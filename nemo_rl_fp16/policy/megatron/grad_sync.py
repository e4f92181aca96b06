"""Gradient reduction of the megatron backend's CPU path through megatron-core's `finalize_model_grads`.

On CUDA, megatron's `DistributedDataParallel` owns the fp32 `main_grad` buffers and the train step
calls `megatron.core.distributed.finalize_model_grads` (DP reduction, then the sum over TP of the
gradients of replicated parameters that see only part of the work: sequence-parallel norms and
router, Qwen3 q/k norms). The CPU path (`mixed_precision.MasterWeights`) accumulates gradients
itself, so with more than one process it hands them to `CpuGradSync`, which calls the same
`finalize_model_grads` over a thin model chunk whose `finish_grad_sync` sums the DP groups
(dense parameters over megatron's data-parallel group, experts over the expert-data-parallel
group, as megatron's DDP does), and clips by the model-parallel norm (TP-duplicated parameters
counted once, as megatron's optimizer does: `param_is_not_tensor_parallel_duplicate`).
"""

from __future__ import annotations

import torch

__all__ = ["CpuGradSync"]


class _Chunk:
    """The model chunk `finalize_model_grads` expects (config, ddp_config, `.module`, `finish_grad_sync`)."""

    def __init__(self, module: torch.nn.Module, config, sync: CpuGradSync):
        from megatron.core.distributed import DistributedDataParallelConfig

        self.module = module
        self.config = config
        self.ddp_config = DistributedDataParallelConfig()
        self._sync = sync

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        self._sync.sum_data_parallel()


class CpuGradSync:
    """Multi-process gradient sync of the CPU megatron path (TP / EP / DP on gloo).

    Args:
        model: the compute `GPTModel` (unwrapped), whose parameters receive the gradients.
        config: its megatron `TransformerConfig` (`sequence_parallel`, `qk_layernorm` pick the TP sums).
    """

    def __init__(self, model: torch.nn.Module, config):
        self.model = model
        self.config = config
        self._params: list[torch.nn.Parameter] = []

    def reduce(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Sum `grads` over DP (per megatron's groups) and the partial TP gradients over TP, in place.

        Args:
            params: the compute model's parameters, in `model.parameters()` order.
            grads: their accumulated gradients (None where a parameter got none on this rank: a
                zero tensor takes its place, as megatron's zero-filled grad buffers do, so every
                rank joins every collective).

        Returns:
            The reduced gradients, one per parameter (fp32 or `grad_reduce_dtype`).
        """
        from megatron.core.distributed import finalize_model_grads

        dtype = next((g.dtype for g in grads if g is not None), torch.float32)
        full = [torch.zeros_like(p, dtype=dtype) if g is None else g for p, g in zip(params, grads, strict=True)]
        self._params = list(params)
        for p, g in zip(params, full, strict=True):
            p.main_grad = g
        try:
            finalize_model_grads([_Chunk(self.model, self.config, self)])
            out = [p.main_grad for p in params]
        finally:
            for p in params:
                del p.main_grad
            self._params = []
        return out

    def sum_data_parallel(self) -> None:
        """Sum `main_grad` over megatron's DP group (dense) and expert-DP group (experts: `allreduce=False`)."""
        from megatron.core import parallel_state as ps

        dense = [p.main_grad for p in self._params if getattr(p, "allreduce", True)]
        expert = [p.main_grad for p in self._params if not getattr(p, "allreduce", True)]
        _all_reduce_sum(dense, ps.get_data_parallel_group())
        _all_reduce_sum(expert, ps.get_expert_data_parallel_group())

    def grad_norm(self, params: list[torch.nn.Parameter]) -> float:
        """The global L2 norm of `params`' `.grad`, TP-duplicated parameters counted once.

        Dense parameters: squares summed over megatron's model-parallel group; experts over the
        expert-tensor-model-pipeline group (megatron's chained optimizer: dense and expert norms
        combined as the root of the summed squares).

        Args:
            params: the fp32 master parameters (megatron's TP attributes on them).

        Returns:
            The norm, identical on every rank.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        sq = torch.zeros(2, dtype=torch.float64)
        for p in params:
            if p.grad is None:
                continue
            expert = not getattr(p, "allreduce", True)
            if expert or param_is_not_tensor_parallel_duplicate(p):
                sq[int(expert)] += p.grad.double().pow(2).sum()
        dense, exp = sq[:1].clone(), sq[1:].clone()
        torch.distributed.all_reduce(dense, group=ps.get_model_parallel_group())
        torch.distributed.all_reduce(exp, group=ps.get_expert_tensor_model_pipeline_parallel_group())
        return float((dense + exp).sqrt())

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip `params`' `.grad` in place to the global norm `max_norm` (torch's rule, global norm).

        Args:
            params: the fp32 master parameters.
            max_norm: the largest global L2 norm kept (coefficient `max_norm / (norm + 1e-6)` when below 1).

        Returns:
            The global norm before clipping (`grad_norm`).
        """
        total = self.grad_norm(params)
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total


def _all_reduce_sum(grads: list[torch.Tensor], group) -> None:
    if not grads or torch.distributed.get_world_size(group) <= 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=group)
    for g, s in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(s)
