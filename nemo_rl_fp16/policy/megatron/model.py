"""The megatron-core model of the megatron backend: config, layer spec, `GPTModel`, and its HF-style wrapper.

Model: a `GPTModel` built from the HF config (`modeling.layout.ModelLayout`, which refuses by
name what it does not map): RMSNorm, SwiGLU, RoPE with HF's inverse frequencies (theta; linear /
llama3 scaling), GQA (also TP > kv heads), sliding window (banded mask; local / SDPA), Qwen2 qkv
bias, Llama/Qwen3 attention and MLP biases, Qwen3 qk-norm, untied or tied embeddings, MoE with
non-grouped `SequentialMLP` experts (grouped GEMM asserts in fp16: Megatron-LM #2102) and
`moe_router_dtype='fp32'` when the policy's `router_dtype` is fp32. Layer spec: Transformer
Engine's when `transformer_engine` imports and the device is CUDA, the local spec otherwise;
`attention="sdpa"` swaps torch SDPA into the local spec (`attention.py`).

`MegatronCausalLM` wraps the `GPTModel` so it is called like an HF causal LM.

Token positions: megatron's RoPE ignores `position_ids` and numbers positions 0..S-1, while the
batch layout (`interfaces.py`) left-pads prompts and positions rows with `cumsum(mask) - 1`. Each
row is therefore rotated so its first real token sits at position 0 (the real tokens are one
contiguous run: left-padded prompt + right-padded response), run under a plain causal mask
(trailing padding cannot influence earlier tokens), and rotated back: exactly the HF positions.
Under sequence parallelism each row is first padded on the right with masked tokens to a multiple
of TP (`sequence_parallel.padded_width`: megatron splits the sequence evenly over TP); `unrotate`
returns real positions only, and the MoE routing (`routing.MegatronRouting.arm`) sees the padded
positions as the router's own choice.

Log-probs stay vocab-parallel: each TP rank casts its vocabulary shard of the logits to
`policy.logits_dtype` (fp32), divides by T, and megatron's `vocab_parallel_cross_entropy`
all-reduces the max, the sum of exponentials and the target logit, so log π(token) is exact
without gathering `[b, T, vocab]` logits (3 GB in fp32 for one 5120-token row of a 152k
vocabulary). `forward()` still gathers full logits for callers that need them (the activation
monitor, HF-style tests).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from nemo_rl_fp16.modeling import effective_temperature, response_width
from nemo_rl_fp16.modeling.layout import ModelLayout
from nemo_rl_fp16.policy.megatron.attention import SDPAttention
from nemo_rl_fp16.policy.megatron.sequence_parallel import padded_width

__all__ = ["MegatronCausalLM", "build_gpt_model", "layer_spec", "logprobs_from_local_logits", "transformer_config",
           "unwrap"]


def transformer_config(lay: ModelLayout, *, params_dtype: torch.dtype, router_dtype: torch.dtype | None = None,
                       tp: int = 1, pp: int = 1, ep: int = 1, sequence_parallel: bool = False,
                       activation_checkpointing: bool = False, cpu: bool = False, fused_elementwise: bool = False,
                       routing_replay: bool = False):
    """The megatron `TransformerConfig` of an HF layout in one dtype (`fp16`/`bf16` flags from it).

    `fused_elementwise` turns on megatron's own `torch.compile`d SwiGLU and bias-dropout-add fusions
    (no TE/apex needed): SwiGLU then rounds once (fp32 inside), as vLLM's `silu_and_mul` kernel does.
    `calculate_per_token_loss=True`: megatron's DDP sums data-parallel gradients (the loss closure
    already weights rows by their share of the global batch).

    Args:
        lay: the model layout.
        params_dtype: the parameters' dtype (float16, bfloat16 or float32).
        router_dtype: float32 computes MoE gate logits in fp32 (`moe_router_dtype='fp32'`).
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        sequence_parallel: megatron sequence parallelism (only when `tp > 1`).
        activation_checkpointing: full, uniform recomputation of every layer.
        cpu: build on CPU (`use_cpu_initialization`; allgather MoE token dispatcher).
        fused_elementwise: megatron's compiled SwiGLU and bias-dropout-add fusions.
        routing_replay: MoE: `moe_enable_routing_replay`, a megatron `RouterReplay` per router
            (`routing.MegatronRouting` drives them).

    Returns:
        `megatron.core.transformer.TransformerConfig` (no dropout, no weight init).
    """
    from megatron.core.transformer import TransformerConfig

    kw: dict[str, Any] = dict(
        num_layers=lay.num_layers, hidden_size=lay.hidden_size, num_attention_heads=lay.num_heads,
        num_query_groups=lay.num_kv_heads, kv_channels=lay.head_dim, ffn_hidden_size=lay.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=lay.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=lay.o_bias or lay.mlp_bias, add_qkv_bias=lay.qkv_bias,
        qk_layernorm=lay.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1, sequence_parallel=bool(sequence_parallel and tp > 1),
        fp16=params_dtype == torch.float16, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_cpu_initialization=cpu, perform_initialization=False,
        bias_activation_fusion=fused_elementwise, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=fused_elementwise, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # the loop's loss closure weights each row by its share of the global batch, so data-parallel
        # ranks' gradients must be summed, not averaged (megatron DDP's scaling factor becomes 1)
        calculate_per_token_loss=True,
    )
    if activation_checkpointing:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if pp > 1:  # hidden states travel between stages in the compute dtype; micro-batches may differ in rows
        kw.update(pipeline_dtype=params_dtype, variable_seq_lengths=True)
        if not lay.is_moe:  # megatron checks the (unused) dispatcher against variable lengths; PP + MoE is refused
            kw.update(moe_token_dispatcher_type="alltoall")
    if lay.is_moe:
        upcast = router_dtype is not None and router_dtype == torch.float32 and params_dtype != torch.float32
        kw.update(num_moe_experts=lay.num_experts, moe_router_topk=lay.moe_top_k,
                  moe_ffn_hidden_size=lay.moe_ffn_hidden_size, moe_grouped_gemm=False,
                  moe_token_dispatcher_type="allgather" if cpu else "alltoall",
                  moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                  moe_router_score_function="softmax",
                  # softmax -> top-k -> renormalise == top-k on logits -> softmax (HF norm_topk_prob)
                  moe_router_pre_softmax=not lay.norm_topk_prob,
                  moe_router_dtype="fp32" if upcast else None, moe_enable_routing_replay=routing_replay)
    return TransformerConfig(**kw)


def layer_spec(lay: ModelLayout, *, use_te: bool, attention: str = "local"):
    """The layer spec: Transformer Engine's, or the local one with megatron's or SDPA attention.

    Args:
        lay: the model layout (experts, qk-norm, biases, sliding window).
        use_te: the TE spec (needs CUDA and transformer_engine).
        attention: with the local spec, `local` or `sdpa` (`attention.SDPAttention`).

    Returns:
        A megatron `ModuleSpec` for `GPTModel`'s decoder layers, with per-block biases as HF has them.

    Raises:
        ValueError: sliding window with TE, or an unknown `attention` with the local spec.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    n_exp = lay.num_experts or None
    if use_te:
        if lay.sliding_window:
            raise ValueError(f"sliding_window={lay.sliding_window} with policy.attention=te is not mapped; "
                             "use policy.attention=sdpa (or local)")
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=n_exp, moe_grouped_gemm=False, qk_layernorm=lay.qk_norm)
        return _bias_per_block(spec, lay)
    spec = specs.get_gpt_layer_local_spec(num_experts=n_exp, moe_grouped_gemm=False,
                                          qk_layernorm=lay.qk_norm, normalization="RMSNorm")
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = (
            type("SDPAttentionWindow", (SDPAttention,), {"window": lay.sliding_window}) if lay.sliding_window
            else SDPAttention)
    elif attention not in ("local", "te"):
        raise ValueError(f"attention must be 'local' or 'sdpa' with the local spec, got {attention!r}")
    return _bias_per_block(spec, lay)


def _without_bias(cls: type) -> type:
    """`cls` (a megatron/TE parallel linear) built with `bias=False` whatever the config says."""

    def __init__(self, *args, **kwargs):
        kwargs["bias"] = False
        cls.__init__(self, *args, **kwargs)

    return type(f"{cls.__name__}NoBias", (cls,), {"__init__": __init__})


def _bias_per_block(spec, lay: ModelLayout):
    """Biases per block as HF has them (attention and MLP separately).

    megatron's `add_bias_linear` is one switch for attention and MLP; HF Llama has two
    (`attention_bias`, `mlp_bias`). With the switch on, the block HF builds without biases gets
    bias-free linears (`linear_qkv` keeps its bias when `add_qkv_bias`).
    """
    if not (lay.o_bias or lay.mlp_bias) or (lay.o_bias and lay.mlp_bias):
        return spec
    sub = spec.submodules
    if not lay.mlp_bias:
        mlp = sub.mlp.submodules
        mlp.linear_fc1, mlp.linear_fc2 = _without_bias(mlp.linear_fc1), _without_bias(mlp.linear_fc2)
    if not lay.o_bias:
        att = sub.self_attention.submodules
        att.linear_proj = _without_bias(att.linear_proj)
        if not lay.qkv_bias:
            att.linear_qkv = _without_bias(att.linear_qkv)
    return spec


def _mcore_compat() -> None:
    """Work around megatron-core 0.16.x's unbound `moe_utils.te_general_gemm` without Transformer Engine.

    Its import sits in a failed `try`, so every MoE router forward raises NameError. Bind it to
    None, the value the code's own `if te_general_gemm is not None` fallback expects (fixed upstream
    by 0.19).
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(lay: ModelLayout, config, *, use_te: bool = False, attention: str = "local"):
    """A megatron `GPTModel` with HF's RoPE inverse frequencies (no weights loaded).

    Args:
        lay: the model layout.
        config: its `transformer_config`.
        use_te: the Transformer Engine layer spec.
        attention: `local` or `sdpa` with the local spec (`layer_spec`).

    Returns:
        `megatron.core.models.gpt.GPTModel` with vocab-parallel output (this pipeline stage's part
        when `config.pipeline_model_parallel_size > 1`: `pipeline.py`); parameters uninitialised
        (`perform_initialization=False`): load them with `sharding.load_shard_`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    _mcore_compat()

    staged = config.pipeline_model_parallel_size > 1
    theta = lay.rope_theta
    gpt = GPTModel(config=config, transformer_layer_spec=layer_spec(lay, use_te=use_te, attention=attention),
                   vocab_size=lay.vocab_size, max_sequence_length=lay.max_position_embeddings,
                   pre_process=ps.is_pipeline_first_stage() if staged else True,
                   post_process=ps.is_pipeline_last_stage() if staged else True, parallel_output=True,
                   share_embeddings_and_output_weights=lay.tie_word_embeddings,
                   position_embedding_type="rope", rotary_percent=1.0,
                   rotary_base=int(theta) if float(theta).is_integer() else theta)
    # RoPE scaling: megatron's own llama3 option hard-codes 8192 original positions and low/high
    # factors 1/4; HF's inverse frequencies (any MAPPED_ROPE_TYPES, config values) are exact
    rope = gpt.rotary_pos_emb
    rope.inv_freq = lay.rope_inv_freq().to(rope.inv_freq.device)
    _mark_tensor_parallel(gpt)
    return gpt


def _mark_tensor_parallel(gpt: torch.nn.Module) -> None:
    """Tag TP-sharded weights with megatron's `tensor_model_parallel` attributes.

    megatron-core sets them only inside its weight init, which `perform_initialization=False`
    skips; without them `param_is_not_tensor_parallel_duplicate` takes every TP rank's shard for a
    duplicate, so the gradient norm (clipping) counts TP rank 0's shards only.
    """
    from megatron.core.tensor_parallel import layers

    for mod in gpt.modules():
        if isinstance(mod, (layers.ColumnParallelLinear, layers.VocabParallelEmbedding)):
            dim = 0
        elif isinstance(mod, layers.RowParallelLinear):
            dim = 1
        else:
            dim = {"column": 0, "row": 1}.get(getattr(mod, "parallel_mode", None))  # TE linears
            if dim is None:
                continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and not getattr(w, "tensor_model_parallel", False):
            layers.set_tensor_model_parallel_attributes(w, True, dim, getattr(mod, "stride", 1))



def logprobs_from_local_logits(local: torch.Tensor, input_ids: torch.Tensor, prompt_width: int, temperature: float,
                               logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log π of the response tokens from this TP rank's vocabulary shard of the logits (vocab-parallel).

    Args:
        local: `[N, T + 1, vocab / TP]` logits of the last `T + 1` positions (HF order), any float dtype.
        input_ids: `[N, P + T]` prompt and response ids.
        prompt_width: P.
        temperature: logits are divided by it (`modeling.effective_temperature`).
        logits_dtype: the dtype of the log-softmax (float32).

    Returns:
        `[N, T]` log-probs in `logits_dtype`, with grad; identical on every TP rank.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    x = local[:, :-1].to(logits_dtype) / effective_temperature(temperature)
    return -vocab_parallel_cross_entropy(x.contiguous(), input_ids[:, prompt_width:].contiguous())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module under `.module` wrappers (`MegatronCausalLM`, DDP, `Float16Module`).

    Args:
        model (torch.nn.Module): a module, possibly wrapped.

    Returns:
        torch.nn.Module: the first module without a `.module` attribute (the `GPTModel`).
    """
    while hasattr(model, "module"):
        model = model.module
    return model


class MegatronCausalLM(torch.nn.Module):
    """HF-call-compatible wrapper: `model(input_ids=, attention_mask=, logits_to_keep=)` -> `.logits`.

    Args:
        gpt: the `GPTModel`, possibly wrapped (`Float16Module`, megatron DDP).
        lay: its layout.

    Returns full-vocabulary logits (TP shards all-gathered) for the last `logits_to_keep`
    positions, in the model's dtype; see the module doc for the row rotation. MoE: `routing`
    (a `routing.MegatronRouting`, set by the policy) arms each forward's replay / record and keeps
    its experts.
    """

    def __init__(self, gpt: torch.nn.Module, lay: ModelLayout):
        super().__init__()
        self.module = gpt
        self.layout = lay
        self.routing = None  # routing.MegatronRouting on MoE models (set by the policy)
        self._routing: dict[int, torch.Tensor] = {}
        cfg = unwrap(gpt).config
        #: forward widths are padded to a multiple of this (TP under sequence parallelism, else 1)
        self.pad_multiple = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
        for i, layer in enumerate(unwrap(gpt).decoder.layers):
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                router.register_forward_hook(self._router_hook(i))

    def _router_hook(self, i: int):
        def hook(_mod, _inp, out):
            if self.routing is not None and self.routing.recording:
                self._routing[i] = out[1].detach()  # routing_map [tokens (s-major), E] bool
        return hook

    def get_decoder(self) -> torch.nn.Module:
        """The `TransformerBlock` (HF's `get_decoder`; the activation monitor finds its layers there).

        Returns:
            torch.nn.Module: the `GPTModel`'s `decoder` (its `layers` are the decoder layers).
        """
        return unwrap(self.module).decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                **_: Any) -> SimpleNamespace:
        """HF-style forward (module doc: rows are rotated so megatron's positions are HF's).

        Args:
            input_ids: `[b, s]` token ids.
            attention_mask: `[b, s]` 1 on real tokens (one contiguous run per row), or None.
            position_ids: ignored (derived from `attention_mask`, as HF's `cumsum - 1`).
            use_cache: ignored (no KV cache).
            logits_to_keep: keep the last this many positions (0: all).

        Returns:
            `.logits`: `[b, keep, vocab]` full-vocabulary logits (TP shards all-gathered) in the
            model's output dtype.

        Raises:
            ValueError: a row of `attention_mask` is not one contiguous run of real tokens.
        """
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        local = self._local_logits(input_ids, attention_mask, logits_to_keep)
        return SimpleNamespace(logits=gather_from_tensor_model_parallel_region(local))

    def response_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                          temperature: float, logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Log π of the response tokens from this rank's vocabulary shard (vocab-parallel; module doc).

        Args:
            input_ids: `[N, P + T]` prompt and response ids (layout: `interfaces.RolloutBatch`).
            attention_mask: `[N, P + T]`.
            prompt_width: P.
            temperature: logits are divided by it (`modeling.effective_temperature`).
            logits_dtype: the dtype of the log-softmax (float32).

        Returns:
            `[N, T]` log-probs in `logits_dtype`, with grad; identical on every TP rank.
        """
        n_resp = response_width(input_ids, prompt_width)
        local = self._local_logits(input_ids, attention_mask, n_resp + 1)
        return logprobs_from_local_logits(local, input_ids, prompt_width, temperature, logits_dtype)

    def rotate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows rotated so each one's first real token sits at position 0 (module doc), and the mask.

        Args:
            input_ids: `[b, s]` token ids.
            attention_mask: `[b, s]` 1 on real tokens (one contiguous run per row), or None.

        Returns:
            (rotated ids `[b, s']`, positions `[b, s']`, boolean causal mask `[1, 1, s', s']` (True =
            masked, with the sliding window), per-row shift `[b]` for `unrotate`), where `s'` is `s`
            padded on the right to a multiple of `pad_multiple` (TP under sequence parallelism, else `s`).

        Raises:
            ValueError: a row of `attention_mask` is not one contiguous run of real tokens.
        """
        b, s = input_ids.shape
        ar = torch.arange(s, device=input_ids.device)
        if attention_mask is None:
            shift = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        else:
            m = attention_mask.long()
            shift = (m.cumsum(-1) == 0).sum(-1)  # leading padding per row
            runs = (m[:, 1:] > m[:, :-1]).sum(-1)  # 0 -> 1 transitions
            if bool((runs > (shift > 0).long()).any()):
                raise ValueError("attention_mask rows must be one contiguous run of real tokens")
        width = s
        s = padded_width(s, self.pad_multiple)  # sequence parallel: a multiple of TP (masked tokens on the right)
        if s != width:
            input_ids = F.pad(input_ids, (0, s - width))
            ar = torch.arange(s, device=input_ids.device)
        src = (ar[None, :] + shift[:, None]) % s  # rotated[i, j] = original[i, (j + shift_i) % s]
        ids = input_ids.gather(1, src)
        pos = ar[None, :].expand(b, s)
        causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).triu_(1)
        if self.layout.sliding_window:  # True = masked: also keys at or before i - window (HF sliding window)
            causal |= torch.ones_like(causal).tril_(-self.layout.sliding_window)
        return ids, pos, causal[None, None], shift

    @staticmethod
    def unrotate(logits: torch.Tensor, shift: torch.Tensor, logits_to_keep: int, width: int | None = None
                 ) -> torch.Tensor:
        """Inverse of `rotate` on the logits: the last `logits_to_keep` real HF positions (0: all).

        Args:
            logits: `[b, s, v]` in rotated positions (`s`: the padded width `rotate` ran).
            shift: `[b]` from `rotate`.
            logits_to_keep: positions to keep from the end of the real width (0: all `width`).
            width: the real (unpadded) width; positions `width .. s - 1` are the sequence-parallel
                padding `rotate` added and are never returned (None: `s`, no padding).

        Returns:
            `[b, keep, v]` in HF positions `width - keep .. width - 1`.
        """
        b, s, v = logits.shape
        width = s if width is None else int(width)
        ar = torch.arange(s, device=logits.device)
        keep = width if not logits_to_keep else int(logits_to_keep)
        back = (ar[width - keep:width][None, :] - shift[:, None]) % s  # original j sits at rotated (j - shift_i)
        return logits.gather(1, back[..., None].expand(b, keep, v))

    def _local_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      logits_to_keep: int) -> torch.Tensor:
        """This rank's vocabulary shard of the logits, `[b, keep, vocab / TP]`, in HF positions."""
        width = input_ids.shape[1]
        ids, pos, causal, shift = self.rotate(input_ids, attention_mask)
        s = ids.shape[1]  # the width padded for sequence parallelism (`width` otherwise)
        ar = torch.arange(s, device=input_ids.device)
        self._routing = {}
        if self.routing is not None:  # megatron-core RouterReplay (routing.py), in rotated positions
            self.routing.arm((ar[None, :] + shift[:, None]) % s, width)
        logits = self.module(input_ids=ids, position_ids=pos, attention_mask=causal)  # [b, s, v/TP]
        if self.routing is not None:
            self.routing.after_forward(self._routing, self.layout.moe_top_k)
        out = self.unrotate(logits, shift, logits_to_keep, width)
        return out

