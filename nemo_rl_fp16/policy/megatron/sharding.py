"""Tensor- and expert-parallel sharding of megatron parameters: split, merge, load, gather.

Names are megatron-core `GPTModel` names (`convert.py`). Under tensor parallelism a column-parallel
linear (`linear_qkv`, `linear_fc1`, the embedding and output layer) is split along dim 0 and a
row-parallel one (`linear_proj`, `linear_fc2`) along dim 1; norms and the MoE router are
replicated. SwiGLU's fused `linear_fc1` is split per half (gate and up separately), as megatron
does. Under expert parallelism each rank holds `num_experts / EP` whole experts, renumbered from 0
(`local_experts.{j}`); experts are not TP-split (`expert_tensor_parallel_size=1`).

The pure functions (`tp_*`, `ep_*`) need no megatron; `shard_state_dict`, `load_shard_` and
`gather_full_state_dict` read megatron's parallel state (`parallel.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from nemo_rl_fp16.modeling.layout import ModelLayout
from nemo_rl_fp16.policy.megatron.model import unwrap

__all__ = ["ep_global_name", "ep_local_experts", "gather_full_state_dict", "load_shard_", "shard_state_dict",
           "tp_merge", "tp_shard", "tp_split_dim"]


_COL = re.compile(r"(linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias)|word_embeddings\.weight|output_layer\.weight)$")
_ROW = re.compile(r"(linear_proj\.weight|linear_fc2\.weight)$")


def tp_split_dim(name: str) -> int | None:
    """The dim a megatron parameter is split along under tensor parallelism.

    Args:
        name: a megatron parameter name (local or TE spec).

    Returns:
        0 (column-parallel), 1 (row-parallel), or None (replicated: norms, router, biases of
        row-parallel linears).
    """
    if ".mlp.router." in name:
        return None
    if _COL.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def _is_glu_fc1(name: str) -> bool:
    return name.endswith(("linear_fc1.weight", "linear_fc1.bias"))


def tp_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's shard of a full megatron parameter (gate/up halves split separately).

    Args:
        name: the parameter's megatron name (`tp_split_dim` decides the dim).
        full: the unsharded tensor.
        rank: this TP rank, `0 <= rank < size`.
        size: the TP size.

    Returns:
        The shard (contiguous), or `full` itself when replicated or `size == 1`.

    Raises:
        ValueError: the split dim does not divide by `size`.
    """
    dim = tp_split_dim(name)
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} does not divide by TP={size}")
    if _is_glu_fc1(name):
        g, u = full.chunk(2, dim=0)
        return torch.cat([g.chunk(size)[rank], u.chunk(size)[rank]]).contiguous()
    return full.chunk(size, dim=dim)[rank].contiguous()


def tp_merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `tp_shard`: the full tensor from every TP rank's shard.

    Args:
        name: the parameter's megatron name.
        shards: the shards in TP rank order.

    Returns:
        The full tensor (`shards[0]` when replicated or a single shard).
    """
    dim = tp_split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if _is_glu_fc1(name):
        halves = [s.chunk(2) for s in shards]
        return torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])])
    return torch.cat(shards, dim=dim)


_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def ep_local_experts(sd: Mapping[str, torch.Tensor], rank: int, size: int, num_experts: int
                     ) -> dict[str, torch.Tensor]:
    """Keep this EP rank's experts, renumbered to local indices (megatron's `local_experts.{j}`).

    Args:
        sd: megatron-named tensors with global expert indices (non-expert entries pass through).
        rank: this EP rank.
        size: the EP size.
        num_experts: experts per MoE layer.

    Returns:
        The non-expert entries and experts `rank * E/size .. (rank + 1) * E/size - 1`, renumbered from 0.

    Raises:
        ValueError: `num_experts` does not divide by `size`.
    """
    if num_experts % size:
        raise ValueError(f"num_experts={num_experts} does not divide by EP={size}")
    per = num_experts // size
    out = {}
    for k, v in sd.items():
        m = _EXPERT.search(k)
        if m is None:
            out[k] = v
            continue
        e = int(m.group(2))
        if rank * per <= e < (rank + 1) * per:
            out[k[: m.start()] + m.group(1) + str(e - rank * per) + m.group(3)] = v
    return out


def ep_global_name(name: str, rank: int, size: int, num_experts: int) -> str:
    """Local expert name on EP rank `rank` -> its global expert name (inverse of `ep_local_experts`).

    Args:
        name: a megatron name (returned unchanged when not an expert's).
        rank: the EP rank that holds it.
        size: the EP size.
        num_experts: experts per MoE layer.

    Returns:
        The name with the global expert index.
    """
    m = _EXPERT.search(name)
    if m is None:
        return name
    return name[: m.start()] + m.group(1) + str(int(m.group(2)) + rank * (num_experts // size)) + m.group(3)


def _ranks() -> tuple[int, int, int, int]:
    """(TP rank, TP size, EP rank, EP size) from megatron's parallel state."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())


def shard_state_dict(full: Mapping[str, torch.Tensor], lay: ModelLayout) -> dict[str, torch.Tensor]:
    """This rank's megatron parameters (local names) from the full megatron state dict.

    Args:
        full: the full (unsharded) megatron state dict, or one piece of it (`hf_to_megatron_parts`).
        lay: the model layout (experts per layer).

    Returns:
        This TP/EP rank's shards under local names (experts renumbered; experts are not TP-split).
    """
    tpr, tps, epr, eps = _ranks()
    sd = ep_local_experts(full, epr, eps, lay.num_experts) if lay.is_moe else dict(full)
    return {k: (v if ".experts." in k else tp_shard(k, v, tpr, tps)) for k, v in sd.items()}


def load_shard_(gpt: torch.nn.Module, shard: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's shard into the model's parameters, in place (names and shapes validated first).

    Each value is copied into the parameter's dtype (one rounding from the shard's dtype).

    Args:
        gpt: the megatron model, possibly wrapped (`Float16Module`, DDP, `MegatronCausalLM`).
        shard: `{local megatron name: tensor}` for exactly the model's parameters.

    Raises:
        ValueError: the names differ (lists up to 8 of each side) or shapes mismatch.
    """
    params = dict(unwrap(gpt).named_parameters())
    if set(params) != set(shard):
        raise ValueError(f"megatron parameter names differ: model-only {sorted(set(params) - set(shard))[:8]}, "
                         f"checkpoint-only {sorted(set(shard) - set(params))[:8]}")
    bad = [f"{k}: {tuple(shard[k].shape)} vs {tuple(p.shape)}" for k, p in params.items() if shard[k].shape != p.shape]
    if bad:
        raise ValueError("shape mismatches: " + "; ".join(bad[:8]))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(shard[k])


def gather_full_state_dict(named: Mapping[str, torch.Tensor], lay: ModelLayout) -> dict[str, torch.Tensor]:
    """All ranks' local megatron tensors -> the full megatron state dict (fp32, CPU), on every rank.

    A collective over the TP and EP groups: every rank must call it with the same names.

    Args:
        named: this rank's parameters under local megatron names (any float dtype).
        lay: the model layout (experts per layer).

    Returns:
        `{megatron name: float32 CPU tensor}` with global expert indices and TP shards merged.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tpr, tps, epr, eps = _ranks()
    out = {}
    for k, v in named.items():
        v = v.detach().float()
        if ".experts." in k and eps > 1:
            parts = [torch.empty_like(v) for _ in range(eps)]
            dist.all_gather(parts, v.contiguous(), group=ps.get_expert_model_parallel_group())
            for r, t in enumerate(parts):
                out[ep_global_name(k, r, eps, lay.num_experts)] = t.cpu()
            continue
        if ".experts." not in k and tps > 1 and tp_split_dim(k) is not None:
            parts = [torch.empty_like(v) for _ in range(tps)]
            dist.all_gather(parts, v.contiguous(), group=ps.get_tensor_model_parallel_group())
            v = tp_merge(k, parts)
        out[k] = v.cpu()
    return out

