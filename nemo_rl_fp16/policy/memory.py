"""Parameter counts and per-GPU memory estimates of one trainer rank, for the dry-run plan.

Everything is computed from the model layout (`ModelLayout`, an HF config) and the parallel
sizes; no model is built and megatron-core need not be installed. The layout comes from, in
order: `model.config` (built-from-config recipes), `<model.name_or_path>/config.json` when that
is a local folder, or `KNOWN_LAYOUTS` for a few hub ids the shipped recipes name.

Estimates (bytes per GPU; megatron's fp16/bf16 mixed-precision layout):
- weights: local parameters x 2 (fp16/bf16; 4 for fp32);
- grads: local parameters x 4 (megatron's fp32 main-grad buffer, `grad_reduce_dtype` fp32);
- optimizer: local parameters x 12 (fp32 master copy + Adam m and v), divided by the
  data-parallel size of each parameter with the distributed optimizer (shown alongside);
- activations: one micro-batch of `seq` tokens through `layers/PP` layers, Korthikanti et al.
  (2022) per layer `s*b*h*(10 + 24/TP + 5*a*s/(h*TP))` bytes (sequence parallel: all of it / TP;
  fused/flash attention drops the `5*a*s/h` score term; full recompute keeps `2*s*b*h` per
  layer plus one layer's full set while it is recomputed);
- logits: the fp32 logits and log-softmax of the vocab-parallel cross entropy, `2 * 4*r*b*V/TP`
  over the `r` response positions only (both backends ask the model for those logits alone).
Local parameters: non-expert parameters / (TP x PP) (embeddings and output layer split over TP on
their stage), expert parameters / (EP x PP) (expert tensor parallelism is 1 in this backend).

Torch backend (`estimate_torch_memory`; HF model, FSDP2 over the DP ranks when DP > 1):
- one rank (DP 1): weights = fp32 master (4) + compute copy (param bytes) per parameter; grads =
  fp32 accumulators (4) + one micro-batch's compute-dtype grads (param bytes); optimizer = Adam
  m and v (8), all unsharded;
- FSDP2 (DP > 1): the fp32 master, its fp32 grads (`reduce_dtype`) and Adam state are sharded
  over DP (4 + 4 + 8 per parameter / DP); each rank also holds the root's all-gathered
  parameters (embeddings, output layer) and two decoder layers' (the one running and the
  prefetched one) in the compute dtype, with their grads;
- activations: as above with TP 1 (HF attention through SDPA: no score matrices); with
  `policy.activation_checkpointing` each layer keeps its input (`2*s*b*h`) plus one layer's full
  set while it is recomputed;
- logits: the model-dtype `[b, r, V]` logits and their gradient (`2 * param_bytes*r*b*V`), plus
  the chunked fp32 log-softmax (`modeling.logprobs.chunked_token_logprobs`: at most 3 fp32 tensors
  of `LOGPROB_CHUNK_ELEMENTS` at a time).
All of it is a planning figure, not a bound: the allocator's fragmentation, the CUDA context and
the communication buffers come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_rl_fp16.modeling.layout import ModelLayout

#: Layouts of hub checkpoints the shipped recipes name (their config.json fields), so a dry run on
#: a login node plans them without a download. A local folder's config.json always wins.
KNOWN_LAYOUTS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-14B": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                             num_key_value_heads=8, intermediate_size=13824, vocab_size=152064,
                             tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=131072),
    "Qwen/Qwen3-30B-A3B": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                               num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                               moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                               norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False,
                               rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "Qwen/Qwen2.5-Math-1.5B": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                                   vocab_size=151936, tie_word_embeddings=True, rope_theta=10000.0,
                                   rms_norm_eps=1e-6, max_position_embeddings=4096),
}
KNOWN_LAYOUTS["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"] = {**KNOWN_LAYOUTS["Qwen/Qwen2.5-14B"],
                                                             "max_position_embeddings": 131072}

GIB = 1024**3


def model_layout(model_cfg: Any) -> tuple[ModelLayout | None, str]:
    """The model layout of a recipe's `model:` block, and where it came from.

    Sources, in order: `model.config`, a local folder's `config.json`, `KNOWN_LAYOUTS`.

    Args:
        model_cfg: the `model:` block (a dict or the pydantic section).

    Returns:
        (layout, source) or (None, why no layout is known).

    Raises:
        ValueError: the HF config names a feature the megatron backend does not map (`ModelLayout.from_hf_config`).
    """
    cfg = model_cfg if isinstance(model_cfg, dict) else model_cfg.model_dump()
    if cfg.get("config"):
        return ModelLayout.from_hf_config(cfg["config"]), "model.config"
    path = cfg.get("name_or_path")
    if path and (Path(path) / "config.json").is_file():
        return ModelLayout.from_hf_config(json.loads((Path(path) / "config.json").read_text())), f"{path}/config.json"
    if path in KNOWN_LAYOUTS:
        return ModelLayout.from_hf_config(KNOWN_LAYOUTS[path]), f"known layout of {path}"
    return None, f"no local {path}/config.json and not a known layout"


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of the megatron backend, in bytes (formulas: module doc).

    Attributes:
        params_local: parameters held by one GPU (its TP/PP/EP share).
        weights: model weights in the compute dtype.
        grads: fp32 gradient buffers.
        optimizer: fp32 main params + Adam moments (12 bytes per local parameter).
        optimizer_distributed: the same with megatron's distributed optimizer (sharded over DP).
        activations: saved activations of one micro-batch (decoder layers).
        logits: the logits and log-softmax of one micro-batch.
    """

    params_local: int
    weights: float
    grads: float
    optimizer: float
    optimizer_distributed: float
    activations: float
    logits: float = 0.0

    @property
    def total(self) -> float:
        """Bytes per GPU without the distributed optimizer."""
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    @property
    def total_distributed(self) -> float:
        """Bytes per GPU with the distributed optimizer."""
        return self.weights + self.grads + self.optimizer_distributed + self.activations + self.logits


def estimate_memory(lay: ModelLayout, *, tp: int, pp: int, ep: int, dp: int, param_bytes: int, micro_batch: int,
                    seq: int, sequence_parallel: bool = False, recompute: bool = False,
                    fused_attention: bool = True, logit_positions: int | None = None) -> MemoryEstimate:
    """Per-GPU bytes of one megatron trainer rank (see module doc for the formulas).

    Args:
        lay: the model layout.
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        dp: data-parallel size.
        param_bytes: bytes per compute-dtype parameter (2 for fp16/bf16).
        micro_batch: rows per micro-batch.
        seq: tokens per row.
        sequence_parallel: megatron sequence parallelism.
        recompute: full activation recomputation (only layer inputs are kept).
        fused_attention: flash/SDPA-style attention (no `[s, s]` score matrices kept).
        logit_positions: positions whose logits are computed (the response width + 1; None: `seq`).

    Returns:
        The estimate (bytes).
    """
    n = lay.num_parameters()
    experts = n["experts"]
    dense = n["total"] - experts
    local_dense = dense / (tp * pp)
    local_experts = experts / (ep * pp)
    local = local_dense + local_experts
    expert_dp = max(dp * tp // ep, 1)  # expert data parallel size with expert TP = 1
    opt = 12 * local
    opt_dist = 12 * (local_dense / dp + local_experts / expert_dp)
    acts = _activations(lay, tp=tp, pp=pp, micro_batch=micro_batch, seq=seq, sequence_parallel=sequence_parallel,
                        recompute=recompute, fused_attention=fused_attention)
    logits = 2 * 4 * (logit_positions or seq) * micro_batch * lay.vocab_size / tp
    return MemoryEstimate(params_local=int(local), weights=param_bytes * local, grads=4 * local, optimizer=opt,
                          optimizer_distributed=opt_dist, activations=acts, logits=logits)


def _activations(lay: ModelLayout, *, tp: int, pp: int, micro_batch: int, seq: int, sequence_parallel: bool,
                 recompute: bool, fused_attention: bool) -> float:
    """Saved activation bytes of one micro-batch through this stage's layers (module doc)."""
    s, b, h, a = seq, micro_batch, lay.hidden_size, lay.num_heads
    layers = -(-lay.num_layers // pp)
    score = 0 if fused_attention else 5 * a * s / (h * tp)
    full = s * b * h * ((34 / tp if sequence_parallel else 10 + 24 / tp) + score)
    if lay.is_moe:  # routed tokens: k copies of the expert MLP activations instead of one dense MLP
        full += s * b * h * 8 * max(lay.moe_top_k - 1, 0) * lay.moe_ffn_hidden_size / max(4 * h, 1)
    if recompute:  # layer inputs, plus one layer's full set while it is recomputed in backward
        return layers * 2 * s * b * h / (tp if sequence_parallel else 1) + full
    return layers * full


def estimate_torch_memory(lay: ModelLayout, *, dp: int, param_bytes: int, micro_batch: int, seq: int,
                          recompute: bool = False, logit_positions: int | None = None) -> MemoryEstimate:
    """Per-GPU bytes of one torch-backend trainer rank (HF model; FSDP2 over DP when DP > 1; module doc).

    Args:
        lay: the model layout.
        dp: data-parallel size (the FSDP2 world; 1: no sharding).
        param_bytes: bytes per compute-dtype parameter (2 for fp16/bf16, 4 for fp32).
        micro_batch: rows per micro-batch.
        seq: tokens per row.
        recompute: `policy.activation_checkpointing` (HF gradient checkpointing of every decoder layer).
        logit_positions: positions whose logits are computed (the response width + 1; None: `seq`).

    Returns:
        The estimate (bytes); `optimizer_distributed` equals `optimizer` (the torch backend's
        sharding is FSDP2's, over DP, already in every figure when DP > 1).
    """
    from nemo_rl_fp16.modeling.logprobs import LOGPROB_CHUNK_ELEMENTS

    n = lay.num_parameters()
    total = n["total"]
    if dp > 1:  # FSDP2: sharded fp32 master/grads/Adam + the unsharded root and two layers in compute dtype
        layer = (total - n["embedding"] - n["output"] - lay.hidden_size) / lay.num_layers
        gathered = n["embedding"] + n["output"] + 2 * layer
        weights = 4 * total / dp + param_bytes * gathered
        grads = 4 * total / dp + param_bytes * gathered
    else:
        weights, grads = (4 + param_bytes) * total, (4 + param_bytes) * total
    opt = 8 * total / dp
    acts = _activations(lay, tp=1, pp=1, micro_batch=micro_batch, seq=seq, sequence_parallel=False,
                        recompute=recompute, fused_attention=True)
    bsv = micro_batch * (logit_positions or seq) * lay.vocab_size
    logits = 2 * param_bytes * bsv + 3 * 4 * min(LOGPROB_CHUNK_ELEMENTS, bsv)
    return MemoryEstimate(params_local=int(total / dp), weights=weights, grads=grads, optimizer=opt,
                          optimizer_distributed=opt, activations=acts, logits=logits)


def fmt_params(n: float) -> str:
    """A parameter count as `1.54B` / `494.0M`.

    Args:
        n (float): a parameter count.

    Returns:
        str: billions with two decimals at or above 1e9, else millions with one.
    """
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def fmt_gib(x: float) -> str:
    """Bytes as GiB with one decimal, e.g. `12.3 GiB`.

    Args:
        x (float): a size in bytes.

    Returns:
        str: the size in GiB (2**30 bytes), one decimal.
    """
    return f"{x / GIB:.1f} GiB"
