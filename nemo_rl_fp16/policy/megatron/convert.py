"""HF <-> megatron-core weight names and layouts (dense and MoE), as pure functions, plus the HF source.

No megatron import here: the mapping is names and shapes only, so it is testable anywhere. The
model's shape facts come from `modeling.layout.ModelLayout`; TP/EP sharding of the converted
tensors is `policy/megatron/sharding.py`. Megatron-Bridge does the same job on Python >= 3.12
GPU environments; this module is the tested path for everything else (Megatron-Bridge does not
install in the CPU CI environment).

Megatron names (GPTModel, *local* layer spec; the TE spec fuses the norms into the next linear,
see `te_names`):

    embedding.word_embeddings.weight                      <- model.embed_tokens.weight
    decoder.layers.{i}.input_layernorm.weight             <- model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight   <- q/k/v_proj.weight, interleaved per query group
    decoder.layers.{i}.self_attention.linear_qkv.bias     <- q/k/v_proj.bias (Qwen2 qkv bias)
    decoder.layers.{i}.self_attention.q_layernorm.weight  <- self_attn.q_norm.weight (Qwen3)
    decoder.layers.{i}.self_attention.k_layernorm.weight  <- self_attn.k_norm.weight (Qwen3)
    decoder.layers.{i}.self_attention.linear_proj.weight  <- o_proj.weight
    decoder.layers.{i}.self_attention.linear_proj.bias    <- o_proj.bias (Llama / Qwen3 attention_bias)
    decoder.layers.{i}.pre_mlp_layernorm.weight           <- post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight              <- cat(gate_proj, up_proj) (SwiGLU: silu(first half) * second)
    decoder.layers.{i}.mlp.linear_fc2.weight              <- down_proj.weight
    decoder.layers.{i}.mlp.linear_fc1.bias / linear_fc2.bias <- cat(gate, up) / down_proj.bias (Llama mlp_bias)
    decoder.layers.{i}.mlp.router.weight                  <- mlp.gate.weight (MoE)
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight <- mlp.experts.gate_up_proj[e]
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight <- mlp.experts.down_proj[e]
    decoder.final_layernorm.weight                        <- model.norm.weight
    output_layer.weight                                   <- lm_head.weight (absent when tied)

QKV layout: megatron stores, for each of the `num_kv_heads` query groups g, the group's
`heads/kv_heads` query heads, then its key head, then its value head:
`[g0: q.. k v | g1: q.. k v | ...]`, each head `head_dim` rows. A TP shard of linear_qkv is a
contiguous slice of rows: whole groups when kv_heads % TP == 0; when TP is a multiple of kv_heads,
a part of one group, which megatron-core all-gathers within the group's ranks.

MoE experts: transformers >= 5 stores fused `experts.gate_up_proj` [E, 2F, H] (gate rows first)
and `experts.down_proj` [E, H, F]; per-expert `experts.{e}.gate_proj/up_proj/down_proj` (older
transformers, Mixtral-style) are accepted on input too. Megatron experts are the non-grouped
`SequentialMLP` (`local_experts.{e}`; the grouped-GEMM path asserts in fp16, Megatron-LM #2102).

Large checkpoints: `hf_to_megatron_parts` converts one decoder layer at a time and
`LazyHFCheckpoint` reads each tensor from the safetensors files only when asked, so a rank keeps
one layer's full tensors plus its own shards instead of the whole fp32 model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_rl_fp16.modeling import build_model, load_weights_
from nemo_rl_fp16.modeling.layout import ModelLayout

__all__ = [
    "LazyHFCheckpoint", "hf_source", "hf_to_megatron", "hf_to_megatron_parts", "megatron_part_to_hf", "megatron_to_hf",
    "qkv_fuse",
    "qkv_split", "te_names",
]


# ---------------------------------------------------------------------------------------------- QKV
def qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: ModelLayout) -> torch.Tensor:
    """HF q/k/v projections -> megatron's grouped-interleaved `linear_qkv` (layout: module doc).

    Args:
        q: `[heads * head_dim, H]` weight or `[heads * head_dim]` bias.
        k: `[kv_heads * head_dim, ...]`, like `q`.
        v: `[kv_heads * head_dim, ...]`, like `q`.
        lay: the model layout (heads, kv heads, head_dim).

    Returns:
        `[(heads + 2 * kv_heads) * head_dim, ...]`, contiguous, in the inputs' dtype.
    """
    g, hd, per = lay.num_kv_heads, lay.head_dim, lay.num_heads // lay.num_kv_heads
    tail = q.shape[1:]
    qg = q.reshape(g, per * hd, *tail)
    kg = k.reshape(g, hd, *tail)
    vg = v.reshape(g, hd, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(g * (per + 2) * hd, *tail).contiguous()


def qkv_split(qkv: torch.Tensor, lay: ModelLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_fuse`: megatron's `linear_qkv` weight or bias -> HF (q, k, v), contiguous.

    Args:
        qkv (torch.Tensor): `[(heads + 2 * groups) * head_dim, ...]` fused weight (`[..., hidden]`) or bias,
            grouped interleaved: per KV group its query heads, then its K head, then its V head.
        lay (ModelLayout): heads, KV groups and head_dim of the model.

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]: q `[heads * head_dim, ...]`, k and v
            `[groups * head_dim, ...]`, in `qkv`'s dtype.
    """
    g, hd, per = lay.num_kv_heads, lay.head_dim, lay.num_heads // lay.num_kv_heads
    tail = qkv.shape[1:]
    x = qkv.reshape(g, (per + 2) * hd, *tail)
    q, k, v = x.split([per * hd, hd, hd], dim=1)
    return (q.reshape(g * per * hd, *tail).contiguous(), k.reshape(g * hd, *tail).contiguous(),
            v.reshape(g * hd, *tail).contiguous())



def _hf_experts(sd: Mapping[str, torch.Tensor], i: int, lay: ModelLayout) -> tuple[list, list]:
    p = f"model.layers.{i}.mlp.experts."
    if p + "gate_up_proj" in sd:
        gu, down = sd[p + "gate_up_proj"], sd[p + "down_proj"]
        return [gu[e] for e in range(lay.num_experts)], [down[e] for e in range(lay.num_experts)]
    fc1, fc2 = [], []
    for e in range(lay.num_experts):
        if p + f"{e}.gate_proj.weight" in sd:  # qwen3-moe, transformers < 5
            fc1.append(torch.cat([sd[p + f"{e}.gate_proj.weight"], sd[p + f"{e}.up_proj.weight"]]))
            fc2.append(sd[p + f"{e}.down_proj.weight"])
        else:  # mixtral: w1 gate, w3 up, w2 down (block_sparse_moe)
            q = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            fc1.append(torch.cat([sd[q + "w1.weight"], sd[q + "w3.weight"]]))
            fc2.append(sd[q + "w2.weight"])
    return fc1, fc2


def hf_to_megatron(sd: Mapping[str, torch.Tensor], lay: ModelLayout) -> dict[str, torch.Tensor]:
    """Full (unsharded) megatron-core GPTModel state dict (local-spec names) from an HF one.

    Args:
        sd: HF-named tensors (any dtype; values are copied or concatenated, never rounded).
        lay: the model layout.

    Returns:
        `{megatron name: tensor}` (names: module doc).

    Raises:
        KeyError: an HF tensor the layout needs is missing.
    """
    out: dict[str, torch.Tensor] = {}
    for part in hf_to_megatron_parts(sd, lay):
        out.update(part)
    return out


def hf_to_megatron_parts(sd: Mapping[str, torch.Tensor], lay: ModelLayout) -> Iterator[dict[str, torch.Tensor]]:
    """`hf_to_megatron` one piece at a time, so a rank can shard each piece and drop it.

    Args:
        sd: HF-named tensors; may load lazily from disk (`LazyHFCheckpoint`).
        lay: the model layout.

    Yields:
        First the embeddings, final norm and output layer; then one dict per decoder layer.
    """
    top: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
                                    "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    if not lay.tie_word_embeddings:
        top["output_layer.weight"] = sd["lm_head.weight"]
    yield top
    for i in range(lay.num_layers):
        out: dict[str, torch.Tensor] = {}
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = h + "self_attn."
        out[m + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = qkv_fuse(sd[a + "q_proj.weight"], sd[a + "k_proj.weight"],
                                                               sd[a + "v_proj.weight"], lay)
        if lay.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = qkv_fuse(sd[a + "q_proj.bias"], sd[a + "k_proj.bias"],
                                                                 sd[a + "v_proj.bias"], lay)
        if lay.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = sd[a + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = sd[a + "k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = sd[a + "o_proj.weight"]
        if lay.o_bias:
            out[m + "self_attention.linear_proj.bias"] = sd[a + "o_proj.bias"]
        out[m + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        if lay.is_moe:
            gate = sd.get(h + "mlp.gate.weight", sd.get(h + "block_sparse_moe.gate.weight"))
            out[m + "mlp.router.weight"] = gate
            fc1, fc2 = _hf_experts(sd, i, lay)
            for e in range(lay.num_experts):
                out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1[e].contiguous()
                out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2[e].contiguous()
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
            if lay.mlp_bias:
                out[m + "mlp.linear_fc1.bias"] = torch.cat([sd[h + "mlp.gate_proj.bias"], sd[h + "mlp.up_proj.bias"]])
                out[m + "mlp.linear_fc2.bias"] = sd[h + "mlp.down_proj.bias"]
        yield out


class LazyHFCheckpoint(Mapping):
    """A local HF folder's safetensors as a read-only, lazy `{name: fp32 tensor}` mapping.

    A tensor is read from disk (memory-mapped) only when it is looked up, for per-rank sharded
    loading; each lookup returns a new float32 CPU tensor.

    Args:
        path: the folder holding `*.safetensors` files.

    Raises:
        FileNotFoundError: the folder holds no `*.safetensors`.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        root = Path(path)
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {root} (this loader reads safetensors checkpoints only)")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                self._where.update(dict.fromkeys(h.keys(), f))

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as h:
            return h.get_tensor(key).float()

    def __contains__(self, key: object) -> bool:  # without reading the tensor (Mapping's default would)
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def megatron_to_hf(sd: Mapping[str, torch.Tensor], lay: ModelLayout, *, fused_experts: bool = True
                   ) -> dict[str, torch.Tensor]:
    """HF state dict from a full megatron one (inverse of `hf_to_megatron`).

    Args:
        sd: full (unsharded) megatron-named tensors (local-spec names).
        lay: the model layout.
        fused_experts: MoE experts as transformers >= 5 fused `experts.gate_up_proj` / `down_proj`;
            False: per-expert Qwen3-MoE names (older transformers).

    Returns:
        `{HF name: tensor}` in the inputs' dtype (`lm_head.weight` is the embedding when tied).
    """
    out = megatron_part_to_hf(sd, lay, None, fused_experts=fused_experts)
    for i in range(lay.num_layers):
        out.update(megatron_part_to_hf(sd, lay, i, fused_experts=fused_experts))
    return out


def megatron_part_to_hf(sd: Mapping[str, torch.Tensor], lay: ModelLayout, layer: int | None, *,
                        fused_experts: bool = True) -> dict[str, torch.Tensor]:
    """One piece of `megatron_to_hf`: the top-level tensors (`layer=None`) or one decoder layer.

    For a per-layer stream (`refit_stream.py`): only that piece's full megatron tensors are needed.

    Args:
        sd: full (unsharded) megatron-named tensors holding at least that piece.
        lay: the model layout.
        layer: the decoder layer index, or None for embeddings, final norm and output layer.
        fused_experts: as `megatron_to_hf`.

    Returns:
        `{HF name: tensor}` of that piece, in the inputs' dtype.
    """
    if layer is None:
        return {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
                "model.norm.weight": sd["decoder.final_layernorm.weight"],
                "lm_head.weight": sd["embedding.word_embeddings.weight"] if lay.tie_word_embeddings
                else sd["output_layer.weight"]}
    out: dict[str, torch.Tensor] = {}
    i = layer
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    a = h + "self_attn."
    out[h + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
    out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = qkv_split(
        sd[m + "self_attention.linear_qkv.weight"], lay)
    if lay.qkv_bias:
        out[a + "q_proj.bias"], out[a + "k_proj.bias"], out[a + "v_proj.bias"] = qkv_split(
            sd[m + "self_attention.linear_qkv.bias"], lay)
    if lay.qk_norm:
        out[a + "q_norm.weight"] = sd[m + "self_attention.q_layernorm.weight"]
        out[a + "k_norm.weight"] = sd[m + "self_attention.k_layernorm.weight"]
    out[a + "o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
    if lay.o_bias:
        out[a + "o_proj.bias"] = sd[m + "self_attention.linear_proj.bias"]
    out[h + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
    if lay.is_moe:
        out[h + "mlp.gate.weight"] = sd[m + "mlp.router.weight"]
        fc1 = [sd[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in range(lay.num_experts)]
        fc2 = [sd[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] for e in range(lay.num_experts)]
        if fused_experts:
            out[h + "mlp.experts.gate_up_proj"] = torch.stack(fc1)
            out[h + "mlp.experts.down_proj"] = torch.stack(fc2)
        else:
            for e in range(lay.num_experts):
                g, u = fc1[e].chunk(2)
                out[h + f"mlp.experts.{e}.gate_proj.weight"] = g.contiguous()
                out[h + f"mlp.experts.{e}.up_proj.weight"] = u.contiguous()
                out[h + f"mlp.experts.{e}.down_proj.weight"] = fc2[e]
    else:
        g, u = sd[m + "mlp.linear_fc1.weight"].chunk(2)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = g.contiguous(), u.contiguous()
        out[h + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
        if lay.mlp_bias:
            g, u = sd[m + "mlp.linear_fc1.bias"].chunk(2)
            out[h + "mlp.gate_proj.bias"], out[h + "mlp.up_proj.bias"] = g.contiguous(), u.contiguous()
            out[h + "mlp.down_proj.bias"] = sd[m + "mlp.linear_fc2.bias"]
    return out


def te_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local-spec names -> Transformer Engine spec names (norms fused into the next linear).

    Args:
        sd: megatron tensors under local-spec names (full or one rank's shard).

    Returns:
        The same tensors; `input_layernorm` / `pre_mlp_layernorm` renamed to the TE linears'
        `layer_norm_weight` (MoE layers keep `pre_mlp_layernorm`).
    """
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.input_layernorm\.weight$", ".self_attention.linear_qkv.layer_norm_weight", k)
        if ".mlp.router." not in k and ".experts." not in k:
            k = re.sub(r"\.pre_mlp_layernorm\.weight$", ".mlp.linear_fc1.layer_norm_weight", k)
        out[k] = v
    return out


def hf_source(model_cfg: Mapping[str, Any], seed: int, initial_state_dict: Mapping[str, torch.Tensor] | None
              ) -> tuple[Mapping[str, torch.Tensor], Any, bool]:
    """The HF weights and config the megatron backend starts from.

    A local safetensors folder (`model.name_or_path`, no `initial_state_dict`) is read lazily, so
    each rank touches one layer at a time (`LazyHFCheckpoint`); otherwise the HF model is built in
    fp32 (seeded config init or checkpoint, `modeling.build_model`) and `initial_state_dict`
    loaded into it.

    Args:
        model_cfg: the recipe's `model:` block.
        seed: seeds a `config`-built model's random init.
        initial_state_dict: fp32 HF state dict to start from (e.g. after a warm start), or None.

    Returns:
        (HF-named fp32 weights, the HF config, whether the HF names fuse MoE experts).

    Raises:
        ValueError: `initial_state_dict` does not match the model (`modeling.load_weights_`).
    """
    path = model_cfg.get("name_or_path")
    if initial_state_dict is None and path and os.path.isdir(path) and any(Path(path).glob("*.safetensors")):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, local_files_only=True,
                                            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
        with torch.device("meta"):  # parameter names only, no memory
            names = list(AutoModelForCausalLM.from_config(config).state_dict())
        return LazyHFCheckpoint(path), config, any(k.endswith("experts.gate_up_proj") for k in names)
    hf = build_model(model_cfg, torch.float32, seed=seed)
    if initial_state_dict is not None:
        load_weights_(hf, initial_state_dict)
    sd = hf.state_dict()
    return sd, hf.config, any(k.endswith("experts.gate_up_proj") for k in sd)

