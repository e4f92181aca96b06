"""The Megatron trainer's weights for a refit as a stream: one piece at a time, to the sending rank only.

`sharding.gather_full_state_dict` all-gathers the whole fp32 model to every rank (what a
checkpoint of the CPU backend needs). A refit needs the weights on one rank only — the one that
sends them to the rollout engines — and never all at once: `stream_hf_weights` walks the model
one **piece** at a time (the embeddings / final norm / output layer, then each decoder layer),
gathers each TP-split tensor over the tensor-parallel group and each expert over the
expert-parallel group **to `dst` only** (`torch.distributed.gather`, not `all_gather`), converts
that piece to HF names (`convert.megatron_part_to_hf`) and yields its tensors, then drops it.

- Only the ranks that own a shard send it: ranks outside `dst`'s TP group (other data-parallel
  replicas, which hold the same values) do nothing for TP-split tensors, ranks outside its EP
  group nothing for experts; replicated tensors (norms, router) are not communicated at all.
- Memory on `dst`: its own shards (the parameters) plus one piece's full fp32 tensors and their
  HF split copies; on every other rank: nothing beyond a contiguous view of its shard. The
  consumer packs the stream into buckets (`rollout.refit.iter_buckets`), so the rollout dtype
  copy is one bucket. Bound checked in `tests/unit/policy/test_megatron_refit_memory.py`.
- Tensors stay on their device (GPU on CUDA): the cast to the rollout dtype happens there.

Every rank of the TP/EP groups must iterate the stream to its end (the gathers are collectives);
the other ranks' iterators yield nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

from nemo_rl_fp16.modeling.layout import ModelLayout
from nemo_rl_fp16.policy.megatron.convert import megatron_part_to_hf
from nemo_rl_fp16.policy.megatron.sharding import _ranks, ep_global_name, tp_merge, tp_split_dim

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def local_spec_names(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformer Engine spec names -> local-spec names (the norms fused into the TE linears split back out).

    Args:
        named: megatron parameters under TE or local-spec names.

    Returns:
        The same tensors under local-spec names (`convert.py`'s).
    """
    return {k.replace(".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight")
            .replace(".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"): v for k, v in named.items()}


def pieces(names: list[str]) -> list[tuple[int | None, list[str]]]:
    """Group megatron names into the stream's pieces: top-level first, then decoder layers in order.

    Args:
        names: local-spec megatron names (one rank's).

    Returns:
        `[(None, top-level names), (0, layer 0 names), (1, ...), ...]`, names in their given order.
    """
    groups: dict[int | None, list[str]] = {None: []}
    for k in names:
        m = _LAYER.match(k)
        groups.setdefault(int(m.group(1)) if m else None, []).append(k)
    return [(None, groups.pop(None))] + sorted(groups.items())


def _gather_to(v: torch.Tensor, group, dst: int, me: int) -> list[torch.Tensor] | None:
    import torch.distributed as dist

    v = v.detach().float().contiguous()
    if me != dst:
        dist.gather(v, None, dst=dst, group=group)
        return None
    parts = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
    dist.gather(v, parts, dst=dst, group=group)
    return parts


def stream_hf_weights(named: Mapping[str, torch.Tensor], lay: ModelLayout, *, fused_experts: bool = True,
                      dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's megatron parameters -> the full model's HF-named fp32 tensors on `dst`, piece by piece.

    A collective over the tensor- and expert-parallel groups (see module doc); every rank must
    iterate it to the end with the same names.

    Args:
        named: this rank's parameters under local-spec megatron names (fp32 master values).
        lay: the model layout (experts per layer, tied embeddings, biases).
        fused_experts: MoE experts under transformers >= 5 fused names (`convert.megatron_to_hf`).
        dst: the global rank that receives (sends to the rollout engines); it must hold TP rank 0.

    Yields:
        On `dst`: `(HF name, fp32 tensor on the parameters' device)`, top-level tensors first, then
        layer by layer; a tensor may alias a live parameter (replicated ones): read, never write.
        On every other rank: nothing.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    _, tps, _, eps = _ranks()
    me = dist.get_rank()
    tp_group = ps.get_tensor_model_parallel_group() if tps > 1 else None
    ep_group = ps.get_expert_model_parallel_group() if eps > 1 else None
    in_tp = tp_group is not None and dst in dist.get_process_group_ranks(tp_group)
    in_ep = ep_group is not None and dst in dist.get_process_group_ranks(ep_group)
    for layer, names in pieces(list(named)):
        full: dict[str, torch.Tensor] = {}
        for k in names:
            v = named[k]
            if ".experts." in k and eps > 1:
                if in_ep:
                    parts = _gather_to(v, ep_group, dst, me)
                    for r, t in enumerate(parts or ()):
                        full[ep_global_name(k, r, eps, lay.num_experts)] = t
            elif ".experts." not in k and tps > 1 and tp_split_dim(k) is not None:
                if in_tp:
                    parts = _gather_to(v, tp_group, dst, me)
                    if parts is not None:
                        full[k] = tp_merge(k, parts)
                    del parts
            elif me == dst:
                full[k] = v.detach().float()
        hf = megatron_part_to_hf(full, lay, layer, fused_experts=fused_experts) if me == dst else {}
        full = {}  # the merged megatron tensors go; HF views of them live until yielded
        while hf:
            name = next(iter(hf))
            yield name, hf.pop(name)  # dropped here as the consumer moves on
