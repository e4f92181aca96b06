"""`MegatronPolicy`: the policy π as a megatron-core `GPTModel` (TP / EP; MoE), same protocol.

Model: a `GPTModel` built from the HF config (`ModelLayout`, which refuses by name what it does not
map): RMSNorm, SwiGLU, RoPE with HF's inverse frequencies (theta; linear / llama3 scaling), GQA
(also TP > kv heads), sliding window (banded mask; local / SDPA), Qwen2 qkv bias, Llama/Qwen3
attention and MLP biases, Qwen3 qk-norm, untied or tied embeddings, MoE with
non-grouped `SequentialMLP` experts (grouped GEMM asserts in fp16: Megatron-LM #2102) and
`moe_router_dtype='fp32'` when the policy's `router_dtype` is fp32. Layer spec: Transformer
Engine's when `transformer_engine` imports and the device is CUDA, the local spec otherwise;
`attention="sdpa"` swaps torch SDPA (flash / cuDNN kernels) into the local spec (`resolve_attention`:
`auto` = TE, else SDPA on CUDA, the local spec's unfused attention on CPU). Measured on one H100
(benchmarks/megatron_step.py, ~1B dense, 4 x 2048 tokens): SDPA 167 ms/step vs local 316 ms.

Weights always come from HF (a seeded `modeling.build_model` init or a local checkpoint) through
`megatron_convert.hf_to_megatron`, sharded per TP/EP rank, so both backends start from the same
fp32 values; `rollout_state_dict()` gathers the shards back into HF names (fp32 master values).

Token positions: megatron's RoPE ignores `position_ids` and numbers positions 0..S-1, while the
batch layout (`interfaces.py`) left-pads prompts and positions rows with `cumsum(mask) - 1`. Each
row is therefore rotated so its first real token sits at position 0 (the real tokens are one
contiguous run: left-padded prompt + right-padded response), run under a plain causal mask
(trailing padding cannot influence earlier tokens), and rotated back: exactly the HF positions.

Log-probs stay vocab-parallel: each TP rank casts its vocabulary shard of the logits to
`policy.logits_dtype` (fp32), divides by T, and megatron's `vocab_parallel_cross_entropy`
all-reduces the max, the sum of exponentials and the target logit, so log π(token) is exact
without gathering `[b, T, vocab]` logits (3 GB in fp32 for one 5120-token row of a 152k
vocabulary). `forward()` still gathers full logits for callers that need them (the activation
monitor, HF-style tests).

Optimizer, two paths:
- CUDA: megatron's `Float16Module` + megatron `DistributedDataParallel` (fp32 grad buffers) +
  `get_megatron_optimizer(OptimizerConfig(fp16/bf16, loss_scale=None, initial_loss_scale,
  min_loss_scale, loss_scale_window, hysteresis, clip_grad))`: fp32 main params, megatron's
  `DynamicGradScaler`, optional distributed optimizer.
- CPU (megatron's optimizer and `DynamicGradScaler` allocate CUDA tensors): the torch backend's
  own machinery, inherited from `TorchPolicy` unchanged: an fp32 master GPTModel with
  torch AdamW and `DynamicLossScaler`, a compute GPTModel in `param_dtype`, fp32 grad
  accumulation, overflow skip. Single process only (TP/EP/DP > 1 on CPU: log-probs only).
  megatron-core on CPU also needs a few hard-coded CUDA calls redirected (`torch.cuda.current_device`,
  the model-parallel RNG tracker's CUDA RNG state); this package does not do that: the test
  fixtures do (`tests/unit/policy/conftest.py`). The CPU path exists for CI.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, TrainStepResult
from nemo_rl_fp16.modeling import build_model, effective_temperature, response_width
from nemo_rl_fp16.policy.megatron_convert import (
    LazyHFCheckpoint,
    ModelLayout,
    ep_global_name,
    ep_local_experts,
    hf_to_megatron,
    hf_to_megatron_parts,
    megatron_to_hf,
    te_names,
    tp_merge,
    tp_shard,
    tp_split_dim,
)
from nemo_rl_fp16.policy.torch_policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy, audit_model, dtype_name, is_router_param

__all__ = ["MegatronPolicy", "MegatronCausalLM", "build_gpt_model", "transformer_config",
           "init_megatron_parallel", "SDPAttention"]


# ------------------------------------------------------------------------------- parallel state
def init_megatron_parallel(tp: int = 1, pp: int = 1, ep: int = 1, *, seed: int = 0, cpu: bool = False) -> None:
    """torch.distributed (single-process if not launched by torchrun) + megatron parallel state + RNG."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        backend = "gloo" if cpu else "nccl"
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    else:
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size())
        if have != (tp, pp, ep):
            raise RuntimeError(f"megatron parallel state already initialised with TP/PP/EP={have}, asked {(tp, pp, ep)}")
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ----------------------------------------------------------------------------- model building
def transformer_config(lay: ModelLayout, *, params_dtype: torch.dtype, router_dtype: torch.dtype | None = None,
                       tp: int = 1, pp: int = 1, ep: int = 1, sequence_parallel: bool = False,
                       activation_checkpointing: bool = False, cpu: bool = False, fused_elementwise: bool = False):
    """megatron `TransformerConfig` for an HF layout in one dtype (`fp16`/`bf16` flags from it).

    `fused_elementwise` turns on megatron's own `torch.compile`d SwiGLU and bias-dropout-add fusions
    (no TE/apex needed): SwiGLU then rounds once (fp32 inside), as vLLM's `silu_and_mul` kernel does.
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
    if lay.is_moe:
        upcast = router_dtype is not None and router_dtype == torch.float32 and params_dtype != torch.float32
        kw.update(num_moe_experts=lay.num_experts, moe_router_topk=lay.moe_top_k,
                  moe_ffn_hidden_size=lay.moe_ffn_hidden_size, moe_grouped_gemm=False,
                  moe_token_dispatcher_type="allgather" if cpu else "alltoall",
                  moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                  moe_router_score_function="softmax",
                  # softmax -> top-k -> renormalise == top-k on logits -> softmax (HF norm_topk_prob)
                  moe_router_pre_softmax=not lay.norm_topk_prob,
                  moe_router_dtype="fp32" if upcast else None)
    return TransformerConfig(**kw)


def layer_spec(lay: ModelLayout, *, use_te: bool, attention: str = "local"):
    """TE spec (CUDA + transformer_engine) or the local spec, optionally with SDPA attention."""
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
    """megatron's `add_bias_linear` is one switch for attention and MLP; HF Llama has two
    (`attention_bias`, `mlp_bias`). With the switch on, the block HF builds without biases gets
    bias-free linears (`linear_qkv` keeps its bias when `add_qkv_bias`)."""
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


ATTENTION_CHOICES = ("auto", "te", "sdpa", "local")


def resolve_attention(attention: str, *, cuda: bool) -> str:
    """`auto` -> `te` (CUDA + Transformer Engine), `sdpa` (CUDA), `local` (CPU); checks the others."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if attention == "auto":
        return ("te" if te_available() else "sdpa") if cuda else "local"
    if attention == "te" and not (cuda and te_available()):
        raise ValueError("attention='te' needs CUDA and transformer_engine; use 'sdpa' or 'auto'")
    return attention


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def _mcore_compat() -> None:
    """megatron-core 0.16.x without Transformer Engine: `moe_utils.te_general_gemm` is never bound
    (its import sits in a failed `try`), so every MoE router forward raises NameError. Bind it to
    None, the value the code's own `if te_general_gemm is not None` fallback expects (fixed upstream
    by 0.19)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(lay: ModelLayout, config, *, use_te: bool = False, attention: str = "local"):
    """megatron `GPTModel` (no weights loaded: `perform_initialization=False`)."""
    from megatron.core.models.gpt import GPTModel

    _mcore_compat()

    theta = lay.rope_theta
    gpt = GPTModel(config=config, transformer_layer_spec=layer_spec(lay, use_te=use_te, attention=attention),
                   vocab_size=lay.vocab_size, max_sequence_length=lay.max_position_embeddings,
                   pre_process=True, post_process=True, parallel_output=True,
                   share_embeddings_and_output_weights=lay.tie_word_embeddings,
                   position_embedding_type="rope", rotary_percent=1.0,
                   rotary_base=int(theta) if float(theta).is_integer() else theta)
    # RoPE scaling: megatron's own llama3 option hard-codes 8192 original positions and low/high
    # factors 1/4; HF's inverse frequencies (any MAPPED_ROPE_TYPES, config values) are exact
    rope = gpt.rotary_pos_emb
    rope.inv_freq = lay.rope_inv_freq().to(rope.inv_freq.device)
    return gpt


class SDPAttention(torch.nn.Module):
    """Drop-in for megatron's local `DotProductAttention`: torch `scaled_dot_product_attention`.

    Causal self-attention only (the RL trainer's case); dispatches to flash / memory-efficient
    kernels on CUDA. Inputs `[s, b, heads, d]` (keys/values with `num_query_groups` heads).
    `window` (a subclass attribute, `layer_spec`): HF sliding-window attention as a banded mask.
    """

    window: int | None = None

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        self.config = config
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, nq, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        band = None
        if self.window:  # HF sliding window: query i sees keys j with i - window < j <= i
            ar = torch.arange(s, device=query.device)
            band = (ar[None, :] <= ar[:, None]) & (ar[None, :] > ar[:, None] - self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=band, is_causal=band is None, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=k.shape[1] != nq)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


class MegatronCausalLM(torch.nn.Module):
    """HF-call-compatible wrapper: `model(input_ids=, attention_mask=, logits_to_keep=)` -> `.logits`.

    Returns full-vocabulary logits (TP shards all-gathered) for the last `logits_to_keep`
    positions, in the model's dtype; see the module doc for the row rotation. With
    `record_experts=True` the MoE routers' top-k choices of the last forward are kept in
    `self.last_experts` (`[b, s, layers, k]`, unrotated, sorted expert ids).
    """

    def __init__(self, gpt: torch.nn.Module, lay: ModelLayout):
        super().__init__()
        self.module = gpt
        self.layout = lay
        self.record_experts = False
        self.last_experts: torch.Tensor | None = None
        self._routing: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(_unwrap(gpt).decoder.layers):
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                router.register_forward_hook(self._router_hook(i))

    def _router_hook(self, i: int):
        def hook(_mod, _inp, out):
            if self.record_experts:
                self._routing[i] = out[1].detach()  # routing_map [tokens (s-major), E] bool
        return hook

    def get_decoder(self) -> torch.nn.Module:
        return _unwrap(self.module).decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                **_: Any) -> SimpleNamespace:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        local = self._local_logits(input_ids, attention_mask, logits_to_keep)
        return SimpleNamespace(logits=gather_from_tensor_model_parallel_region(local))

    def response_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                          temperature: float, logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`[N, T]` log π of the response tokens from this rank's vocabulary shard (module doc)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        n_resp = response_width(input_ids, prompt_width)
        local = self._local_logits(input_ids, attention_mask, n_resp + 1)[:, :-1]
        x = local.to(logits_dtype) / effective_temperature(temperature)
        return -vocab_parallel_cross_entropy(x.contiguous(), input_ids[:, prompt_width:].contiguous())

    def _local_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      logits_to_keep: int) -> torch.Tensor:
        """This rank's vocabulary shard of the logits, `[b, keep, vocab / TP]`, in HF positions."""
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
        src = (ar[None, :] + shift[:, None]) % s  # rotated[i, j] = original[i, (j + shift_i) % s]
        ids = input_ids.gather(1, src)
        pos = ar[None, :].expand(b, s)
        causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).triu_(1)
        if self.layout.sliding_window:  # True = masked: also keys at or before i - window (HF sliding window)
            causal |= torch.ones_like(causal).tril_(-self.layout.sliding_window)
        causal = causal[None, None]
        self._routing = {}
        logits = self.module(input_ids=ids, position_ids=pos, attention_mask=causal)  # [b, s, v/TP]
        keep = s if not logits_to_keep else int(logits_to_keep)
        back = (ar[s - keep:][None, :] - shift[:, None]) % s  # original j sits at rotated (j - shift_i)
        out = logits.gather(1, back[..., None].expand(b, keep, logits.shape[-1]))
        if self.record_experts and self._routing:
            k = self.layout.moe_top_k
            per_layer = []
            for i in sorted(self._routing):
                rm = self._routing[i].reshape(s, b, -1).transpose(0, 1)  # [b, s(rotated), E]
                idx = rm.int().topk(k, dim=-1).indices.sort(-1).values  # the k selected ids, sorted
                per_layer.append(idx.gather(1, ((ar[None, :] - shift[:, None]) % s)[..., None].expand(b, s, k)))
            self.last_experts = torch.stack(per_layer, dim=2)
        return out


# ----------------------------------------------------------------------------- weights & ranks
def hf_source(model_cfg: Mapping[str, Any], seed: int, initial_state_dict: Mapping[str, torch.Tensor] | None
              ) -> tuple[Mapping[str, torch.Tensor], Any, bool]:
    """(HF-named fp32 weights, HF config, whether HF names fuse MoE experts) to start from.

    A local safetensors folder (`model.name_or_path`, no `initial_state_dict`) is read lazily, so
    each rank touches one layer at a time (`LazyHFCheckpoint`); otherwise the HF model is built in
    fp32 (seeded config init or checkpoint) and `initial_state_dict` loaded into it.
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
        from nemo_rl_fp16.modeling import load_weights_

        load_weights_(hf, initial_state_dict)
    sd = hf.state_dict()
    return sd, hf.config, any(k.endswith("experts.gate_up_proj") for k in sd)


def _ranks() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())


def shard_state_dict(full: Mapping[str, torch.Tensor], lay: ModelLayout) -> dict[str, torch.Tensor]:
    """This rank's megatron parameters (local names) from the full megatron state dict."""
    tpr, tps, epr, eps = _ranks()
    sd = ep_local_experts(full, epr, eps, lay.num_experts) if lay.is_moe else dict(full)
    return {k: (v if ".experts." in k else tp_shard(k, v, tpr, tps)) for k, v in sd.items()}


def load_shard_(gpt: torch.nn.Module, shard: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's shard into the model's parameters (names/shapes validated first)."""
    params = dict(_unwrap(gpt).named_parameters())
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
    """All ranks' local megatron tensors -> the full megatron state dict (fp32, CPU), on every rank."""
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


# ---------------------------------------------------------------------------------- the trainer
class MegatronPolicy(TorchPolicy):
    """PolicyEngine over a megatron-core GPTModel (see module doc for both optimizer paths).

    Args: as `TorchPolicy`, plus the recipe's parallel sizes (`tensor_parallel_size`,
    `pipeline_parallel_size` (1 only in this version), `expert_parallel_size`, `sequence_parallel`,
    `activation_checkpointing`), `use_distributed_optimizer` (CUDA), `attention` (`auto` | `te` |
    `sdpa` | `local`, see `resolve_attention`) and `fused_elementwise` (see `transformer_config`).
    """

    def __init__(self, model_cfg: Mapping[str, Any], policy: PrecisionPolicy, *, lr: float,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, micro_batch_size: int = 8,
                 seed: int = 0, device: torch.device | str = "cpu",
                 initial_state_dict: Mapping[str, torch.Tensor] | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, expert_parallel_size: int = 1,
                 sequence_parallel: bool = False, activation_checkpointing: bool = False,
                 use_distributed_optimizer: bool = False, attention: str = "auto", fused_elementwise: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if policy.master_dtype != torch.float32:
            raise ValueError(f"master weights must be float32, policy has {dtype_name(policy.master_dtype)}")
        if pipeline_parallel_size != 1:
            raise NotImplementedError("pipeline_parallel_size > 1 is not implemented in the megatron trainer yet")
        self.precision = policy
        self.device = torch.device(device)
        self.cpu = self.device.type == "cpu"
        self.max_grad_norm = float(max_grad_norm)
        self.micro_batch_size = int(micro_batch_size)
        self.grad_hook = None
        self._fsdp = False  # TorchPolicy flags the inherited CPU machinery reads
        self._lora = False
        tp, ep = int(tensor_parallel_size), int(expert_parallel_size)
        init_megatron_parallel(tp, 1, ep, seed=seed, cpu=self.cpu)

        hf_sd, hf_config, self._hf_fused_experts = hf_source(model_cfg, seed, initial_state_dict)
        self.layout = ModelLayout.from_hf_config(hf_config)
        problems = self.layout.parallel_problems(tp, 1, ep)
        if problems:
            raise ValueError("; ".join(problems))
        shard: dict[str, torch.Tensor] = {}
        for part in hf_to_megatron_parts(hf_sd, self.layout):  # one layer's full tensors at a time
            shard.update(shard_state_dict(part, self.layout))
        del hf_sd
        if attention == "auto" and self.layout.sliding_window and not self.cpu:
            attention = "sdpa"  # TE's sliding window is not mapped (layer_spec)
        self.attention = attention = resolve_attention(attention, cuda=not self.cpu)
        use_te = attention == "te"
        if use_te:
            shard = te_names(shard)
        self.use_te = use_te
        self._shard = shard

        def make(dtype: torch.dtype):
            cfg = transformer_config(self.layout, params_dtype=dtype, router_dtype=policy.router_dtype, tp=tp, ep=ep,
                                     sequence_parallel=sequence_parallel,
                                     activation_checkpointing=activation_checkpointing, cpu=self.cpu,
                                     fused_elementwise=fused_elementwise)
            gpt = build_gpt_model(self.layout, cfg, use_te=use_te, attention=attention).to(self.device)
            for p in gpt.parameters():  # megatron builds norms in fp32 whatever params_dtype (Float16Module casts)
                p.data = p.data.to(dtype)
            self._router_to_fp32(gpt)
            load_shard_(gpt, shard)  # after the casts: each tensor rounded once, from fp32
            return gpt, cfg

        self._world_is_one = not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)
        ls = policy.loss_scale
        if self.cpu:
            # CPU fallback: TorchPolicy's master/compute/AdamW/DynamicLossScaler machinery as is.
            from nemo_rl_fp16.precision import DynamicLossScaler

            gpt32, self.tconfig = make(torch.float32)
            self.master = MegatronCausalLM(gpt32, self.layout).eval()
            if policy.param_dtype == torch.float32:
                self.compute = self.master
            else:
                gptc, self.tconfig = make(policy.param_dtype)
                self.compute = MegatronCausalLM(gptc, self.layout).eval()
            self._compute_stale = True
            self._master_params = list(self.master.parameters())
            self._compute_params = list(self.compute.parameters())
            self._acc = [None] * len(self._compute_params)
            self.optimizer = torch.optim.AdamW(self._master_params, lr=lr, weight_decay=weight_decay)
            self.scaler = DynamicLossScaler.from_config(ls) if ls.enabled else None
            self.mcore_optimizer = None
        else:
            self._init_cuda(make, lr, weight_decay, use_distributed_optimizer)
        del self._shard

    # -------------------------------------------------------------------------- CUDA path
    def _init_cuda(self, make, lr: float, weight_decay: float, use_distributed_optimizer: bool) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        pol = self.precision
        # params_dtype/fp16/bf16 of the policy (Float16Module reads config.fp16/bf16); megatron's
        # optimizer then creates the fp32 main params from these (HF fp32 values rounded once).
        gpt, self.tconfig = make(pol.param_dtype)
        if pol.param_dtype != torch.float32:
            gpt = Float16Module(self.tconfig, gpt)  # casts params to fp16/bf16, logits back to fp32
            self._router_to_fp32(gpt)
            load_shard_(gpt, self._shard)  # fp32 router values exact (not fp16-rounded), others rounded once
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=pol.grad_reduce_dtype == torch.float32,
                                                overlap_grad_reduce=False,
                                                use_distributed_optimizer=use_distributed_optimizer)
        self.ddp = DistributedDataParallel(self.tconfig, ddp_cfg, gpt)
        ls = pol.loss_scale
        fp16 = pol.param_dtype == torch.float16
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, fp16=fp16, bf16=pol.param_dtype == torch.bfloat16,
            params_dtype=pol.param_dtype, clip_grad=self.max_grad_norm,
            # fp16: None = megatron's DynamicGradScaler; 1.0 = constant (scaling disabled). bf16/fp32: no scaler.
            loss_scale=1.0 if (fp16 and not ls.enabled) else None,
            initial_loss_scale=ls.initial_scale, min_loss_scale=ls.min_scale,
            loss_scale_window=ls.growth_interval, hysteresis=ls.hysteresis,
            use_distributed_optimizer=use_distributed_optimizer)
        self.mcore_optimizer = get_megatron_optimizer(opt_cfg, [self.ddp])
        self.master = self.compute = MegatronCausalLM(self.ddp, self.layout).eval()
        self._master_params = self._compute_params = list(self.ddp.parameters())
        self._compute_stale = False
        self.optimizer = self.mcore_optimizer
        self.scaler = None

    def _router_to_fp32(self, model: torch.nn.Module) -> None:
        """Keep MoE router weights in fp32 when `router_dtype` is fp32 (as the rollout's fp32 gate)."""
        if self.precision.router_dtype != torch.float32:
            return
        for name, p in model.named_parameters():
            if is_router_param(name):
                p.data = p.data.float()

    # -------------------------------------------------------------------------- protocol
    def _gemm_ctx(self):
        if self.cpu:
            return super()._gemm_ctx()
        import contextlib

        return contextlib.nullcontext()

    def _dp(self) -> tuple[int, int]:
        """Megatron's data-parallel rank and size: each DP rank scores and trains its slice of rows."""
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def _dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def _score(self, mb: RolloutBatch, temperature: float) -> torch.Tensor:
        return self.compute.response_logprobs(mb.input_ids.to(self.device), mb.attention_mask.to(self.device),
                                              mb.prompt_width, temperature, self.precision.logits_dtype)

    def selected_experts(self, batch: RolloutBatch) -> torch.Tensor:
        """`[N, T, layers, k]` expert ids the trainer's routers pick for response token t.

        Token t's entry is the routing of position `P + t - 1`, the forward that scores token t
        (the same position the log-prob comes from). Compare with `batch.rollout_experts` through
        `mismatch.router_topk_flip_rate`.
        """
        if not self.layout.is_moe:
            raise ValueError("selected_experts needs an MoE model")
        self._sync_compute()
        out = []
        self.compute.record_experts = True
        try:
            with torch.no_grad(), self._gemm_ctx():
                for rows in self._micro_batches(batch.num_samples):
                    mb = batch.select(rows)
                    self.compute(input_ids=mb.input_ids.to(self.device), attention_mask=mb.attention_mask.to(self.device),
                                 logits_to_keep=1)
                    p = mb.prompt_width
                    out.append(self.compute.last_experts[:, p - 1: -1].cpu())
        finally:
            self.compute.record_experts = False
        return torch.cat(out)

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
        if self.cpu:
            if not self._world_is_one:
                raise NotImplementedError("CPU megatron train_step runs single-process only (no TP/EP/DP grads sync)")
            return super().train_step(batch, loss_fn, temperature)
        return self._train_step_cuda(batch, loss_fn, temperature)

    def _train_step_cuda(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
        opt = self.mcore_optimizer
        self.ddp.zero_grad_buffer()
        opt.zero_grad()
        scale = float(opt.get_loss_scale())
        self.compute.train()
        loss_sum, metric_sums, micro = self._forward_backward(
            batch, loss_fn, temperature, lambda loss: opt.scale_loss(loss.to(self.device)).backward())
        self.ddp.finish_grad_sync()
        if self.grad_hook is not None:  # test/debug hook on the fp32 main grads (e.g. plant an inf)
            self.grad_hook([p.main_grad for p in self._compute_params if getattr(p, "main_grad", None) is not None])
        ok, grad_norm, _ = opt.step()
        self.compute.eval()
        skipped = not ok
        grad_norm = float("nan") if skipped or grad_norm is None else float(grad_norm)
        metrics = {"loss": loss_sum, **metric_sums, "loss_scale": scale, "skipped": float(skipped)}
        return TrainStepResult(skipped=skipped, grad_norm=grad_norm, loss_scale=scale, metrics=metrics,
                               micro_metrics=micro)

    def back_off_loss_scale(self, used_scale: float) -> bool:
        """As `TorchPolicy.back_off_loss_scale`; on CUDA on megatron's `DynamicGradScaler`."""
        if self.cpu:
            return super().back_off_loss_scale(used_scale)
        from megatron.core.optimizer.grad_scaler import DynamicGradScaler

        opts = getattr(self.mcore_optimizer, "chained_optimizers", [self.mcore_optimizer])
        scalers = {id(o.grad_scaler): o.grad_scaler for o in opts if getattr(o, "grad_scaler", None) is not None}
        if not scalers or not all(isinstance(gs, DynamicGradScaler) for gs in scalers.values()):
            return False  # bf16/fp32 or a constant scale: a retry would run at the same scale
        for gs in scalers.values():  # the same rule as DynamicLossScaler.back_off_below
            if float(gs.scale) < used_scale:
                continue
            lower = max(float(used_scale) * float(gs.backoff_factor), float(gs.min_scale))
            if not lower < used_scale:
                return False
            gs._scale = torch.full_like(gs._scale, lower)
            gs._hysteresis_tracker = 0
        return True

    # -------------------------------------------------------------------------- weights
    def _fp32_named_params(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under megatron names, fp32 master values."""
        if self.cpu:
            return {k: v for k, v in _unwrap(self.master.module).named_parameters()}
        main = {}
        opts = getattr(self.mcore_optimizer, "chained_optimizers", [self.mcore_optimizer])
        for o in opts:
            for mg, fg in zip(getattr(o, "float16_groups", []), getattr(o, "fp32_from_float16_groups", []), strict=False):
                for mp, fp in zip(mg, fg, strict=True):
                    main[id(mp)] = fp
        return {k: main.get(id(p), p) for k, p in _unwrap(self.ddp).named_parameters()}

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights under HF names (TP/EP shards gathered), for the rollout refit.

        With the distributed optimizer on CUDA the fp32 shards are not gathered: the values are
        the model's fp16/bf16 parameters upcast (they equal the rounded master values).
        """
        named = self._fp32_named_params()
        if self.use_te:
            named = {k.replace(".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight")
                      .replace(".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"): v
                     for k, v in named.items()}
        full = gather_full_state_dict(named, self.layout)
        return megatron_to_hf(full, self.layout, fused_experts=self._hf_fused_experts)

    def load_state_dict(self, state: dict) -> None:
        if not self.cpu:
            raise NotImplementedError("resume of the CUDA megatron trainer: use megatron dist-checkpointing (not yet)")
        if (state.get("scaler") is None) != (self.scaler is None):
            raise ValueError("checkpoint and trainer disagree on loss scaling (precision.loss_scale.enabled)")
        full = hf_to_megatron(state["model"], self.layout)
        load_shard_(self.master.module, shard_state_dict(full, self.layout))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._compute_stale = True

    def audit(self) -> list[str]:
        """Dtype findings on the megatron module: params vs param_dtype, routers vs router_dtype,
        the effective router compute dtype (`moe_router_dtype`), master/optimizer state fp32 (CPU)."""
        lines = super().audit() if self.cpu else audit_model(self.compute, self.precision)
        if self.layout.is_moe:
            eff = {"fp32": torch.float32, "fp64": torch.float64}.get(self.tconfig.moe_router_dtype or "",
                                                                     self.precision.param_dtype)
            if eff != self.precision.router_dtype:
                lines.append(f"<router compute>: megatron moe_router_dtype={self.tconfig.moe_router_dtype} computes gate "
                             f"logits in {dtype_name(eff)}, expected {dtype_name(self.precision.router_dtype)} (router_dtype)")
        return lines
