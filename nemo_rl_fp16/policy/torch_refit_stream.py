"""The torch trainer's weights for a refit as a stream: one parameter at a time, to the sending rank only.

`TorchPolicy.rollout_state_dict()` under FSDP2 builds the full fp32 state dict on rank 0
(`get_model_state_dict(full_state_dict=True)`): the whole model at once. A refit needs each weight
once, on the rank that sends it to the rollout engines, and never all of them together:

- FSDP2 (`stream_fsdp`): the master's parameters are `DTensor`s sharded on dim 0 over a 1-D mesh
  (`fully_shard`; torch.chunk split, the last shards shorter or empty). Each one is gathered **to
  `dst` only** (`torch.distributed.gather` of the local shards, each padded to the first shard's
  row count, then concatenated and cut to the global row count), yielded, and dropped before the
  next. Every other rank sends its shard and holds nothing beyond it (a padded copy of its shard
  at most). Any other placement (not produced by `fully_shard` here) falls back to
  `DTensor.full_tensor()` (an all-gather: one full parameter on every rank, still one at a time).
  Plain tensors (buffers in the state dict) are yielded on `dst` as they are.
- LoRA (`stream_merged_lora`, single process): the base model's state dict in order, each LoRA
  target's weight merged when it comes (`W + scaling * B @ A`, peft's `get_delta_weight`), so one
  merged weight exists at a time, not a merged model.

Names and order are the model's `state_dict()` (HF names), so the stream equals the full-state
refit bitwise (`tests/integration/test_fsdp_refit_memory.py`). Tensors stay on their device (the
cast to the rollout dtype happens there, in `rollout.refit.iter_buckets`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch


def _gather_rows_to(local: torch.Tensor, rows: int, group, dst: int, me: int) -> torch.Tensor | None:
    """Dim-0 shards (torch.chunk split) of one tensor -> the whole tensor on `dst`, None elsewhere."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    per = -(-rows // world)  # torch.chunk's shard length
    local = local.detach()
    if local.shape[0] != per:  # a shorter (or empty) last shard: pad so every rank sends the same size
        pad = local.new_zeros((per - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    local = local.contiguous()
    if me != dst:
        dist.gather(local, None, dst=dst, group=group)
        return None
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.gather(local, parts, dst=dst, group=group)
    full = torch.cat(parts)[:rows]
    del parts
    return full


def stream_fsdp(model: torch.nn.Module, dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """An FSDP2-sharded model's state dict, one full tensor at a time, on global rank `dst` only.

    A collective over the model's mesh: every rank iterates it to the end (the other ranks'
    iterators yield nothing).

    Args:
        model: the `fully_shard`-ed module (its parameters are DTensors).
        dst: the global rank that receives (sends to the rollout engines).

    Yields:
        On `dst`: `(HF name, tensor)` in `model.state_dict()` order, each the full unsharded value
        in the parameter's dtype (fp32 master) on its device. On every other rank: nothing.

    Raises:
        ValueError: `dst` is not in a DTensor's mesh.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    me = dist.get_rank()
    for name, v in model.state_dict().items():
        if not isinstance(v, DTensor):
            if me == dst:
                yield name, v.detach()
            continue
        mesh = v.device_mesh
        if mesh.ndim == 1 and tuple(v.placements) == (Shard(0),):
            group = mesh.get_group()
            if dst not in dist.get_process_group_ranks(group):
                raise ValueError(f"refit sender rank {dst} is not in the FSDP mesh of {name}")
            full = _gather_rows_to(v.to_local(), v.shape[0], group, dst, me)
        else:
            full = v.full_tensor().detach()  # an all-gather: one parameter on every rank
            full = full if me == dst else None
        if full is not None:
            yield name, full
        del full


def stream_merged_lora(peft_model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's HF-named weights with each LoRA delta merged as it comes (one merged weight at a time).

    Args:
        peft_model: a peft `PeftModel` (fp32 base and adapters).

    Yields:
        `(HF name, fp32 tensor)` in the base model's `state_dict()` order without the adapters'
        entries, `.base_layer.` dropped from the names; a LoRA target's weight is `W + delta`
        (a new tensor), every other one the live parameter (read, never write).
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    owners = {f"{name}.weight": m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for k, v in base.state_dict().items():
        if ".lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        m = owners.get(k)
        if m is None:
            yield k, v.detach()
            continue
        with torch.no_grad():
            merged = v.detach() + sum(m.get_delta_weight(a) for a in m.active_adapters)
        yield k, merged
        del merged


def stream_policy(master: torch.nn.Module, *, lora: bool, fsdp: bool, dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """`TorchPolicy.rollout_stream`: the refit's weights one tensor at a time on rank `dst` only.

    Equals `TorchPolicy.rollout_state_dict()` bitwise, name for name and in order, without ever
    holding it whole. A collective under FSDP (every rank iterates it to the end).

    Args:
        master: the policy's fp32 master (peft-wrapped with LoRA, `fully_shard`-ed under FSDP).
        lora: LoRA adapters (merged per weight, `stream_merged_lora`).
        fsdp: FSDP2-sharded (`stream_fsdp`).
        dst: the global rank that sends to the rollout engines.

    Returns:
        An iterator of `(HF name, fp32 tensor)` (empty on the other ranks).
    """
    if lora:
        return stream_merged_lora(master)
    if fsdp:
        return stream_fsdp(master, dst)
    return iter([(k, v.detach()) for k, v in master.state_dict().items()])


def check_items(master: torch.nn.Module, *, lora: bool) -> LazyItems | dict[str, torch.Tensor]:
    """What the refit's non-finite check (`ray_refit.checked_stream`) reads on this rank.

    Args:
        master: the policy's fp32 master.
        lora: LoRA: the merged weights are what is sent, so they are checked, one at a time.

    Returns:
        `LazyItems` over the merged stream (LoRA), else this rank's own fp32 parameters (FSDP:
        its local shards).
    """
    if lora:
        return LazyItems(lambda: stream_merged_lora(master))
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach() for k, v in master.named_parameters()}


class LazyItems:
    """A mapping-like view whose `items()` runs a stream afresh (for a check that reads each tensor once)."""

    def __init__(self, make: Callable[[], Iterable[tuple[str, torch.Tensor]]]):
        """Wrap `make`, called on every `items()`.

        Args:
            make: returns a fresh `(name, tensor)` iterable.
        """
        self._make = make

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The stream's `(name, tensor)` pairs, made afresh.

        Returns:
            A fresh iterable from `make()`.
        """
        return self._make()
