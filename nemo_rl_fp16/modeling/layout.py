"""`ModelLayout`: the shape facts of a decoder-only HF model, and which HF features map to megatron.

Read from an HF config (`ModelLayout.from_hf_config`), which refuses by name every feature the
megatron backend would compute differently from HF/vLLM (`FEATURES` lists what is mapped). Used by
the megatron backend (`policy/megatron/`: conversion, sharding, model config), the memory
estimate (`policy/memory.py`) and the dry-run plan (`plan.py`). No torch or megatron import at
module level, so the plan can use it anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FEATURES", "MAPPED_ROPE_TYPES", "SUPPORTED_MODEL_TYPES", "ModelLayout"]


@dataclass(frozen=True)
class ModelLayout:
    """The shape facts of a decoder-only HF model that conversion, sharding and the plan need.

    Field names follow megatron's `TransformerConfig` where one exists; sizes are element counts.
    Build it with `from_hf_config`, which fills every field from the HF config.

    Attributes:
        model_type: HF `model_type` (one of `SUPPORTED_MODEL_TYPES`).
        num_layers: decoder layers (HF `num_hidden_layers`).
        hidden_size: model width H.
        num_heads: attention (query) heads.
        num_kv_heads: key/value heads (query groups, GQA).
        head_dim: width of one head.
        ffn_hidden_size: dense MLP width F (HF `intermediate_size`).
        vocab_size: vocabulary size (unpadded).
        tie_word_embeddings: the output layer shares the embedding matrix.
        qkv_bias: q/k/v projections have biases (Qwen2; Llama/Qwen3 `attention_bias`).
        qk_norm: per-head RMSNorm on queries and keys (Qwen3).
        num_experts: routed experts per MoE layer (0: dense).
        moe_ffn_hidden_size: one expert's MLP width (HF `moe_intermediate_size`).
        moe_top_k: experts per token (HF `num_experts_per_tok`).
        norm_topk_prob: the top-k routing weights are renormalised to sum to 1.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        max_position_embeddings: HF `max_position_embeddings`.
        rope_type: HF `rope_parameters.rope_type` (`MAPPED_ROPE_TYPES`).
        rope_scaling: the other `rope_parameters` fields, sorted `(key, value)` pairs.
        sliding_window: the window W when every layer attends through it (token i sees j in
            (i - W, i]); None: full attention.
        o_bias: o_proj has a bias (Llama / Qwen3 `attention_bias`).
        mlp_bias: gate/up/down_proj have biases (Llama `mlp_bias`).
    """

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
        """Whether the MLPs are routed experts (`num_experts > 0`)."""
        return self.num_experts > 0

    def rope_inv_freq(self):
        """RoPE inverse frequencies exactly as HF computes them, scaling included.

        Source: HF's own `ROPE_INIT_FUNCTIONS` on a config rebuilt from this layout.

        Returns:
            `[head_dim / 2]` float32 tensor on CPU (radians per position).

        Raises:
            ValueError: the rope type scales attention (not mapped; `MAPPED_ROPE_TYPES` do not).
        """
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

        Args:
            cfg: a `transformers.PretrainedConfig` or a mapping of its fields.

        Returns:
            The layout.

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

        Args:
            tp: tensor-parallel size (`policy.tensor_parallel_size`).
            pp: pipeline-parallel size.
            ep: expert-parallel size.

        Returns:
            One line per problem, naming the recipe key and the sizes.
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
        if pp > 1 and self.is_moe:
            out.append(f"policy.pipeline_parallel_size={pp} with an MoE model ({self.model_type}) is not implemented "
                       "(expert routing records and EP through megatron's pipeline schedule are not wired); "
                       "use policy.pipeline_parallel_size=1 with tensor/expert parallelism")
        if ep > 1 and not self.is_moe:
            out.append(f"policy.expert_parallel_size={ep} needs an MoE model ({self.model_type} is dense)")
        elif self.is_moe and self.num_experts % ep:
            out.append(f"experts ({self.num_experts}) not divisible by policy.expert_parallel_size={ep}")
        return out

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total, per-token active (MoE), and the parts the memory estimate needs.

        Returns:
            Element counts: `total`, `active` (per token: top-k experts only), `embedding`,
            `output` (0 when tied), `experts` (all layers), `per_layer_dense` (one layer without
            its experts).
        """
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

