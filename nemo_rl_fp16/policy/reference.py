"""`ReferencePolicy`: the frozen KL reference π_ref as a forward-only scorer (`algorithm.kl_coef > 0`).

It used to be a second full policy engine: fp32 master weights, a compute copy, AdamW state and
gradient buffers (+34 GiB per GPU at 14B on the megatron backend). π_ref only ever scores
batches, so it keeps one copy of the weights in `precision.param_dtype` with `requires_grad`
off — no master, no optimizer, no gradients — and scores through the same micro-batch loop
(`micro_batches.MicroBatchLoop`) and model adapter as the policy backend it mirrors. Its
log-probs are bitwise those of the full engine built from the same weights: the compute copy is
the same fp32 values rounded once to `param_dtype` (the torch backend's `cast_params_`, the
megatron backend's `MegatronPolicy(forward_only=True)`), run by the same kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop
from nemo_rl_fp16.precision import PrecisionPolicy, audit_model

__all__ = ["ReferencePolicy", "build_reference"]


class ReferencePolicy:
    """Forward-only π_ref: weights in `param_dtype`, no optimizer, no gradients.

    Args:
        loop: the micro-batch loop over the backend's adapter (data-parallel split and gathers).
        compute: the scoring model (parameters frozen).
        precision: the policy-side precision.
    """

    def __init__(self, loop: MicroBatchLoop, compute: torch.nn.Module, precision: PrecisionPolicy):
        self.loop = loop
        self.compute = compute
        self.precision = precision
        for p in compute.parameters():
            p.requires_grad_(False)

    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """Log π_ref of the batch's response tokens (no grad; each data-parallel rank scores its rows).

        Args:
            batch: the rollout batch (`N` rows, responses of width `T`).
            temperature: the sampling temperature the logits are divided by.

        Returns:
            `[N, T]` fp32, 0 where masked, on the batch's device.
        """
        return self.loop.logprobs(batch, temperature)

    def audit(self) -> list[str]:
        """Dtype findings on the scoring model, plus any parameter that would take gradients.

        Returns:
            One line per finding (empty: clean).
        """
        lines = audit_model(self.compute, self.precision)
        if any(p.requires_grad for p in self.compute.parameters()):
            lines.append("<reference>: parameters require grad (π_ref must be frozen)")
        return lines

    def num_bytes(self) -> int:
        """Bytes held by the reference's parameters (what the plan counts for π_ref).

        Returns:
            The sum of `numel * element_size` over the scoring model's parameters (this rank).
        """
        return sum(p.numel() * p.element_size() for p in self.compute.parameters())


def build_reference(rc: Any, model_cfg: Mapping[str, Any], precision: PrecisionPolicy, device: str,
                    init: Mapping[str, torch.Tensor] | None) -> ReferencePolicy:
    """The forward-only π_ref of the recipe's policy backend, from the same starting weights as π.

    Args:
        rc: the typed recipe (`policy.backend`, `micro_batch_size`, parallel sizes, `attention`,
            `router_replay`, `sequence_packing`: π_ref scores as π does) and `seed`.
        model_cfg: the recipe's `model:` block.
        precision: the policy-side precision (`param_dtype` is the reference's weight dtype).
        device: `cpu` or `cuda`.
        init: fp32 starting weights (HF names); None = load `model.name_or_path`.

    Returns:
        The `ReferencePolicy`.
    """
    p = rc.policy
    if p.backend == "megatron":
        from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

        mp = MegatronPolicy(
            model_cfg, precision, lr=p.lr, micro_batch_size=p.micro_batch_size, seed=rc.seed, device=device,
            initial_state_dict=init, tensor_parallel_size=p.tensor_parallel_size,
            pipeline_parallel_size=p.pipeline_parallel_size, expert_parallel_size=p.expert_parallel_size,
            sequence_parallel=p.sequence_parallel, attention=p.attention, fused_elementwise=p.fused_elementwise,
            router_replay=p.router_replay, sequence_packing=p.sequence_packing, forward_only=True)
        return ReferencePolicy(mp.loop, mp.compute, precision)
    return _torch_reference(model_cfg, precision, micro_batch_size=p.micro_batch_size, seed=rc.seed,
                            device=device, init=init, router_replay=p.router_replay,
                            sequence_packing=p.sequence_packing)


def _torch_reference(model_cfg: Mapping[str, Any], precision: PrecisionPolicy, *, micro_batch_size: int, seed: int,
                     device: str, init: Mapping[str, torch.Tensor] | None, router_replay: str,
                     sequence_packing: bool = False) -> ReferencePolicy:
    """The torch backend's π_ref: `TorchPolicy`'s compute copy alone (fp32 built, loaded, rounded once)."""
    from nemo_rl_fp16.modeling import build_model, cast_params_, load_weights_
    from nemo_rl_fp16.modeling.moe_routing import RouterHooks, run_gates_in_weight_dtype
    from nemo_rl_fp16.policy.expert_routing import ExpertRouting
    from nemo_rl_fp16.policy.torch_policy import HFModelAdapter

    dev = torch.device(device)
    model = build_model(model_cfg, torch.float32, seed=seed, device=dev)
    if init is not None:
        load_weights_(model, init)
    if precision.param_dtype != torch.float32:  # as TorchPolicy's compute copy (router kept in router_dtype)
        cast_params_(model, precision.param_dtype, router_dtype=precision.router_dtype)
    if precision.router_dtype != precision.param_dtype:
        run_gates_in_weight_dtype(model)
    model.eval()
    routing = RouterHooks(model)
    experts = ExpertRouting(routing if routing.routers else None, router_replay, dev)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    # data parallel over the default group as the FSDP policy does (each rank scores its rows), unsharded weights
    adapter = HFModelAdapter(model, precision, dev, experts=experts,
                             fsdp=dist and torch.distributed.get_world_size() > 1)
    return ReferencePolicy(MicroBatchLoop(adapter, micro_batch_size, packing=sequence_packing), model, precision)
