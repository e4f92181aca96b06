"""Distributed (sharded) checkpoints of the megatron backend, with megatron-core's `dist_checkpointing`.

Every rank writes its own shards of one global state into one folder (a collective over all
ranks); a later run loads the slices its own ranks need, so the layout may change in between:

- model: `GPTModel.sharded_state_dict()` (the fp32 master model on CPU; on CUDA the
  fp16/bf16 model, whose fp32 copy travels with the optimizer). Keys are megatron's global names
  with global shapes (TP splits, GLU halves, EP's expert numbering are megatron's own factories),
  so megatron-core re-slices them for another TP / EP / DP layout.
- optimizer: CPU, torch AdamW over the fp32 master: its `exp_avg` / `exp_avg_sq` sharded like
  their parameters and one common `step` (megatron's `FP32Optimizer.sharded_state_dict` recipe,
  `dist_checkpointing.optimizer` helpers); CUDA, megatron's own optimizer
  `sharded_state_dict(model_sd)`: Adam moments, fp32 main params (`fp32_from_fp16_params`) and
  the `DynamicGradScaler`; with the distributed optimizer in the `fully_sharded_model_space`
  format (reshardable across DP). Param-group hyperparameters (lr, betas, weight decay) are not
  stored: they come from the resuming run's config, as megatron does (`LocalNonpersistentObject`).
- loss scaler (CPU path): `DynamicLossScaler.state_dict()`, common.
- RNG: each rank's python / numpy / torch RNG states and megatron's model-parallel RNG tracker,
  one `ShardedObject` per global rank. Restored only when the world size is unchanged (with
  another layout the ranks' streams do not correspond; dropout is 0 in this package, so the
  tracker draws nothing during training).
- a record of the writer (`RECORD_KEY`): format, TP/PP/EP/DP, optimizer kind, layer spec, model
  layout, checked before anything is read so a load that cannot work is one line naming both
  layouts.

Resharding: TP, EP and DP may change between save and load (megatron-core re-slices global
tensors; measured on CPU with gloo: TP=2 -> TP=1, EP=2 -> EP=1). Refused in one line: another
model, another optimizer kind (CPU AdamW, megatron's optimizer, megatron's distributed optimizer:
different state structures), another layer spec (TE vs local; megatron stores local norms under
TE names, but loading across specs is not verified here), another PP size (megatron's keys carry
global layer offsets, so the same PP size loads: measured PP=2 -> PP=2 on CPU; across PP sizes is
not verified).

Storage: megatron's default `torch_dist` strategy (PyTorch distributed checkpoint files
`__*_*.distcp`, `common.pt`, `metadata.json`); the caller (`checkpoint.save_checkpoint`) makes the
step folder atomic and checksums every file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nemo_rl_fp16.guards import check_weights
from nemo_rl_fp16.policy.megatron.model import unwrap

if TYPE_CHECKING:
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

__all__ = ["FORMAT", "RECORD_KEY", "describe_layout", "layout_record", "load_sharded", "save_sharded"]

FORMAT = "nemo_rl_fp16.megatron_dist/1"
RECORD_KEY = "nemo_rl_fp16"


def _gpt(policy: MegatronPolicy) -> torch.nn.Module:
    """The `GPTModel` whose parameters are checkpointed (fp32 master on CPU; the DDP-wrapped one on CUDA)."""
    return unwrap(policy.master.module)


def _optimizer_kind(policy: MegatronPolicy) -> str:
    if policy.weights is not None:
        return "cpu-adamw"
    return "mcore-distributed" if getattr(policy, "use_distributed_optimizer", False) else "mcore"


def layout_record(policy: MegatronPolicy) -> dict[str, Any]:
    """What a checkpoint written by `policy` needs from a reader, as plain values.

    Args:
        policy: the writing (or reading) policy; reads megatron's parallel state.

    Returns:
        {"format", "tp", "pp", "ep", "dp", "world", "optimizer", "layer_spec", "model"}: sizes as
        ints, `optimizer` one of cpu-adamw / mcore / mcore-distributed, `layer_spec` te / local,
        `model` the `ModelLayout` fields.
    """
    from megatron.core import parallel_state as ps

    return {
        "format": FORMAT,
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
        "world": torch.distributed.get_world_size(),
        "optimizer": _optimizer_kind(policy), "layer_spec": "te" if policy.use_te else "local",
        "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(policy.layout).items()},
    }


def describe_layout(rec: dict[str, Any]) -> str:
    """One phrase for a layout record, e.g. `TP=2 PP=1 EP=1 DP=1 (optimizer cpu-adamw, local layer spec)`.

    Args:
        rec (dict[str, Any]): a layout record (`layout_record`: tp, pp, ep, dp, optimizer, spec).

    Returns:
        str: the phrase that refusals and logs print.
    """
    return (f"TP={rec['tp']} PP={rec['pp']} EP={rec['ep']} DP={rec['dp']} "
            f"(optimizer {rec['optimizer']}, {rec['layer_spec']} layer spec)")


def _rng_object(policy: MegatronPolicy):
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing import ShardedObject

    from nemo_rl_fp16.runtime import capture_rng

    state = {"host": capture_rng(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _cpu_optimizer_state(policy: MegatronPolicy, model_sd: dict, is_loading: bool) -> dict:
    """The torch AdamW state, sharded like the master parameters (megatron `FP32Optimizer` recipe)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    opt = policy.weights.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    if is_loading and not opt.state:  # a template to load into (AdamW creates its state lazily)
        for p in params:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
    sd = opt.state_dict()
    step = MegatronOptimizer._extract_common_per_param_step(sd)
    optim_state_to_sharding_state(sd, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys=("step",))
    sd["state"]["common_step"] = step
    return sd


def _sharded_state_dict(policy: MegatronPolicy, is_loading: bool) -> dict:
    model_sd = _gpt(policy).sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd, RECORD_KEY: layout_record(policy), "rng": _rng_object(policy)}
    if policy.weights is not None:
        state["optimizer"] = _cpu_optimizer_state(policy, model_sd, is_loading)
        state["scaler"] = policy.weights.scaler_state()
    else:
        metadata = {"distrib_optim_sharding_type": "fully_sharded_model_space"}
        state["optimizer"] = policy.mcore_optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                      metadata=metadata)
    return state


def save_sharded(policy: MegatronPolicy, directory: str | Path, step: int | None = None) -> None:
    """Write the policy's model, optimizer, loss scale and RNG as one distributed checkpoint.

    A collective: every rank calls it with the same (shared-filesystem) `directory`, which must
    exist and be empty.

    Args:
        policy: the megatron policy.
        directory: the folder to write into (megatron `torch_dist` files).
        step: the RL step, for the non-finite message.

    Raises:
        NonFiniteError: a master weight of this rank is NaN/inf (checked before anything is written;
            every rank checks its own shard).
    """
    from megatron.core import dist_checkpointing

    check_weights(policy._fp32_named_params(), "checkpoint", step, policy.precision.param_dtype)
    dist_checkpointing.save(_sharded_state_dict(policy, is_loading=False), str(directory))


def _refusal(saved: dict[str, Any], here: dict[str, Any]) -> str | None:
    if saved.get("format") != FORMAT:
        return f"format {saved.get('format')!r}, this version reads {FORMAT!r}"
    if saved["model"] != here["model"]:
        diff = sorted(k for k in here["model"] if saved["model"].get(k) != here["model"][k])
        return "a different model (" + ", ".join(f"{k}: {saved['model'].get(k)} vs {here['model'][k]}"
                                                 for k in diff[:4]) + ")"
    for key, what in (("optimizer", "optimizer kind (its state has another structure)"),
                      ("layer_spec", "layer spec (TE vs local: loading across them is not verified in this version)"),
                      ("pp", "pipeline-parallel size (loading across PP sizes is not verified in this version)")):
        if saved[key] != here[key]:
            return f"the {what} differs"
    return None


def load_sharded(policy: MegatronPolicy, directory: str | Path) -> dict[str, Any]:
    """Load a `save_sharded` checkpoint into `policy` (any TP / EP / DP layout megatron-core can reshard).

    A collective. Checks the writer's record first, then loads model, optimizer, loss scale and
    (same world size only) the RNG states, in place.

    Args:
        policy: the megatron policy to restore (built from the same recipe).
        directory: a folder written by `save_sharded`.

    Returns:
        {"saved": the writer's layout record, "rng_restored": bool}.

    Raises:
        ValueError: one line naming both layouts when the checkpoint cannot load into this one
            (another model, optimizer kind, layer spec or PP size; loss scaling on one side only;
            or megatron-core's own refusal).
    """
    from megatron.core import dist_checkpointing

    here = layout_record(policy)
    saved = dist_checkpointing.load_common_state_dict(str(directory))[RECORD_KEY]
    head = f"cannot load the distributed checkpoint {directory} written at {describe_layout(saved)} into {describe_layout(here)}"
    why = _refusal(saved, here)
    if why:
        raise ValueError(f"{head}: {why}")
    same_world = saved["world"] == here["world"]
    template = _sharded_state_dict(policy, is_loading=True)
    if not same_world:
        from megatron.core.dist_checkpointing import LocalNonpersistentObject

        template["rng"] = LocalNonpersistentObject(None)
    if policy.weights is not None:
        try:
            policy.weights.check_scaler_state(dist_checkpointing.load_common_state_dict(str(directory)))
        except ValueError as e:
            raise ValueError(f"{head}: {e}") from None
    try:
        loaded = dist_checkpointing.load(template, str(directory))
    except Exception as e:  # megatron-core's message, first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{head}: {type(e).__name__}: {first}") from e
    _gpt(policy).load_state_dict(loaded["model"], strict=True)
    if policy.weights is not None:
        opt_sd = loaded["optimizer"]
        step = opt_sd["state"].pop("common_step")
        if step is None:  # saved before the first step: AdamW starts afresh
            policy.weights.optimizer.state.clear()
        else:
            for s in opt_sd["state"].values():
                s["step"] = step.clone() if isinstance(step, torch.Tensor) else step
            policy.weights.optimizer.load_state_dict(opt_sd)
        policy.weights.load_scaler_state(loaded)  # also marks the compute copy stale (recast from the master)
    else:
        policy.mcore_optimizer.load_state_dict(loaded["optimizer"])
        policy.mcore_optimizer.reload_model_params()
    rng_restored = same_world and isinstance(loaded.get("rng"), dict)
    if rng_restored:
        from megatron.core import tensor_parallel

        from nemo_rl_fp16.runtime import restore_rng

        restore_rng(loaded["rng"]["host"])
        tensor_parallel.get_cuda_rng_tracker().set_states(loaded["rng"]["tracker"])
    return {"saved": saved, "rng_restored": rng_restored}
