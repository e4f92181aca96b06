"""Modeling: the HF models both torch engines run, the log-prob math, MoE routing helpers.

- `hf`: build / cast / load an HF causal LM from a recipe's `model:` block; find its layers.
- `logprobs`: positions, temperature, fp32 token log-probs (one definition for π and µ).
- `moe_routing`: MoE families, router capture and replay (top-k expert ids).
"""

from nemo_rl_fp16.modeling.hf import (
    DEFAULT_ATTN_IMPLEMENTATION,
    build_model,
    cache_kwarg,
    cast_params_,
    decoder_layers,
    load_weights_,
)
from nemo_rl_fp16.modeling.logprobs import (
    effective_temperature,
    logprob_table,
    position_ids_from_mask,
    response_logprobs,
    response_width,
    token_logprobs,
)

__all__ = [
    "DEFAULT_ATTN_IMPLEMENTATION", "build_model", "cache_kwarg", "cast_params_", "decoder_layers",
    "effective_temperature", "load_weights_", "logprob_table", "position_ids_from_mask", "response_logprobs",
    "response_width", "token_logprobs",
]
