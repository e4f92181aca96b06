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
  copy is one bucket. Bound checked in `tests/integration/test_megatron_refit_memory.py` (TP=2, EP=2, PP=2).
- Tensors stay on their device (GPU on CUDA): the cast to the rollout dtype happens there.

Pipeline stages (`stream_hf_weights_pp`): each stage's rank in `dst`'s pipeline group gathers its
own layers (TP/EP, as above) and sends each piece point-to-point to `dst`, one at a time; `dst`
receives the stages in order. No rank holds more than one piece beyond its shards (the sender: its
piece; `dst`: one received piece and its HF copies), where the old path all-gathered every stage
to every rank.

Every rank of the TP/EP (and pipeline) groups must iterate the stream to its end (the gathers are
collectives); the other ranks' iterators yield nothing.
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


def _top_to_hf(full: Mapping[str, torch.Tensor], lay: ModelLayout) -> dict[str, torch.Tensor]:
    """`megatron_part_to_hf(layer=None)` on whichever top-level tensors `full` holds (a pipeline stage holds some)."""
    out = {}
    if "embedding.word_embeddings.weight" in full:
        out["model.embed_tokens.weight"] = full["embedding.word_embeddings.weight"]
        if lay.tie_word_embeddings:
            out["lm_head.weight"] = full["embedding.word_embeddings.weight"]
    if "decoder.final_layernorm.weight" in full:
        out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    if "output_layer.weight" in full and not lay.tie_word_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"]
    return out


def _full_pieces(named: Mapping[str, torch.Tensor], lay: ModelLayout, dst: int
                 ) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """Each piece's full (TP/EP-gathered) megatron tensors on `dst`, `{}` elsewhere; a collective."""
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
        yield layer, full
        del full


def _to_hf(full: dict[str, torch.Tensor], lay: ModelLayout, layer: int | None,
           fused_experts: bool) -> Iterator[tuple[str, torch.Tensor]]:
    hf = _top_to_hf(full, lay) if layer is None else megatron_part_to_hf(full, lay, layer, fused_experts=fused_experts)
    full.clear()  # the merged megatron tensors go; HF views of them live until yielded
    while hf:
        name = next(iter(hf))
        yield name, hf.pop(name)  # dropped here as the consumer moves on


def stream_hf_weights(named: Mapping[str, torch.Tensor], lay: ModelLayout, *, fused_experts: bool = True,
                      dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's megatron parameters -> the full model's HF-named fp32 tensors on `dst`, piece by piece.

    A collective over the tensor- and expert-parallel groups (see module doc); every rank must
    iterate it to the end with the same names. No pipeline stages (`stream_hf_weights_pp`).

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

    me = dist.get_rank()
    for layer, full in _full_pieces(named, lay, dst):
        if me == dst:
            yield from _to_hf(full, lay, layer, fused_experts)


def _send_piece(full: dict[str, torch.Tensor], layer: int | None, dst: int) -> None:
    import torch.distributed as dist

    head = [(layer, [(k, list(v.shape)) for k, v in full.items()])]
    dist.send_object_list(head, dst=dst)  # the trainers' own group (names and shapes only)
    for v in full.values():
        dist.send(v.contiguous(), dst=dst)


def _recv_pieces(src: int, device: torch.device) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    import torch.distributed as dist

    while True:
        head: list = [None]
        dist.recv_object_list(head, src=src)
        if head[0] is None:
            return
        layer, spec = head[0]
        full = {}
        for k, shape in spec:
            full[k] = torch.empty(shape, dtype=torch.float32, device=device)
            dist.recv(full[k], src=src)
        yield layer, full
        del full


def stream_hf_weights_pp(named: Mapping[str, torch.Tensor], lay: ModelLayout, *, fused_experts: bool = True,
                         dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """`stream_hf_weights` with pipeline stages: each layer sent by the stage that owns it, one at a time.

    `dst`'s pipeline group has one rank per stage (the stage's **sender**). Each stage runs the
    piece stream over its own layers (global indices) with its sender as the TP/EP gather target;
    a sender other than `dst` sends each gathered piece (megatron names, fp32) point-to-point to
    `dst` (names and shapes by `send_object_list`, then each tensor by `send`) and drops it; `dst`
    takes the stages in order, its own pieces in place, the others' as they arrive, and converts
    each piece to HF names. The last stage's copy of a tied embedding is not sent. Memory: a sender
    holds one piece; `dst` one received piece and its HF copies; the other ranks their shards.

    Args:
        named: this stage's parameters under local-spec megatron names, local layer indices.
        lay: the model layout.
        fused_experts: as `stream_hf_weights`.
        dst: the global rank that receives; it must hold TP rank 0.

    Yields:
        On `dst`: `(HF name, fp32 tensor)`, stage by stage (each stage's top-level tensors, then its
        layers); nothing elsewhere.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_rl_fp16.policy.megatron.pipeline import stage_layers

    me = dist.get_rank()
    stage, size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()))
    senders = next(r for r in every if dst in r)  # dst's pipeline group: one rank per stage, in stage order
    off = stage_layers(lay.num_layers).start
    mine = {}
    for k, v in named.items():
        m = _LAYER.match(k)
        if m is not None:
            k = f"decoder.layers.{int(m.group(1)) + off}." + k[m.end():]
        elif lay.tie_word_embeddings and k == "output_layer.weight" and stage > 0:
            continue  # the last stage's copy of the tied embedding
        mine[k] = v
    own = _full_pieces(mine, lay, senders[stage])
    if me == dst:
        device = next(iter(named.values())).device
        for s in range(size):
            src = own if s == stage else _recv_pieces(senders[s], device)
            for layer, full in src:
                yield from _to_hf(full, lay, layer, fused_experts)
    elif me == senders[stage]:
        for layer, full in own:
            _send_piece(full, layer, dst)
            full.clear()
        dist.send_object_list([None], dst=dst)
    else:
        for _ in own:  # this stage's TP/EP gathers to its sender
            pass
