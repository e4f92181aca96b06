"""The π engine a recipe names: `build_policy` (one per process; one per rank under torch.distributed)."""

from __future__ import annotations

from nemo_rl_fp16.config import RecipeConfig
from nemo_rl_fp16.interfaces import PolicyEngine
from nemo_rl_fp16.precision import PrecisionPolicy


def build_policy(rc: RecipeConfig, model_cfg: dict, precision: PrecisionPolicy, device: str,
                 init: dict | None) -> PolicyEngine:
    """The `PolicyEngine` that `policy.backend` names, in `precision`, from the run's fp32 weights.

    `torch`: `TorchPolicy` (HF model, fp32 master, FSDP2 under torch.distributed, optional LoRA
    and R3 router replay). `megatron`: `MegatronPolicy` (megatron-core, TP/EP/SP, needs CUDA and
    the `megatron` extra; `assembly.check_policy_backend` refuses what it cannot run first).

    Args:
        rc (RecipeConfig): the typed recipe; reads `policy.*` (lr, weight_decay, max_grad_norm,
            micro_batch_size, parallel sizes, lora, router_replay, attention, sequence_packing, ...) and `seed`.
        model_cfg (dict): the recipe's `model:` block (`RecipeConfig.model.model_dump()`).
        precision (PrecisionPolicy): the trainer side's dtypes and loss scaling.
        device (str): `cpu` or `cuda` (the run's device, `plan.run_device`).
        init (dict | None): fp32 starting weights (HF names); None = load `model.name_or_path`.

    Returns:
        PolicyEngine: the π engine, its master weights equal to `init` (or the checkpoint).
    """
    p = rc.policy
    if p.backend == "megatron":
        from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

        return MegatronPolicy(
            model_cfg, precision, lr=p.lr, weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm,
            micro_batch_size=p.micro_batch_size, seed=rc.seed, device=device, initial_state_dict=init,
            tensor_parallel_size=p.tensor_parallel_size, pipeline_parallel_size=p.pipeline_parallel_size,
            expert_parallel_size=p.expert_parallel_size, sequence_parallel=p.sequence_parallel,
            activation_checkpointing=p.activation_checkpointing, attention=p.attention,
            fused_elementwise=p.fused_elementwise, router_replay=p.router_replay,
            sequence_packing=p.sequence_packing,
            use_distributed_optimizer=distributed_optimizer(p.use_distributed_optimizer, device))
    from nemo_rl_fp16.policy.torch_policy import TorchPolicy

    return TorchPolicy(model_cfg, precision, lr=p.lr, weight_decay=p.weight_decay,
                       max_grad_norm=p.max_grad_norm, micro_batch_size=p.micro_batch_size,
                       seed=rc.seed, device=device, initial_state_dict=init,
                       lora=p.lora.model_dump() if p.lora.enabled else None, router_replay=p.router_replay,
                       activation_checkpointing=p.activation_checkpointing, sequence_packing=p.sequence_packing)


def distributed_optimizer(value: bool | None, device: str) -> bool:
    """`policy.use_distributed_optimizer` resolved: null is on with CUDA, off on CPU (megatron backend).

    The one rule for the policy build and the dry-run plan's memory figure.

    Args:
        value: the recipe's `policy.use_distributed_optimizer` (None: auto).
        device: the run's device (`plan.run_device`).

    Returns:
        Whether megatron's distributed optimizer shards the fp32 main params and Adam state over DP.
    """
    return (device == "cuda") if value is None else bool(value)
