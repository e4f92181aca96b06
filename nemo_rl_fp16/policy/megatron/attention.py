"""Core attention choices for the megatron backend: Transformer Engine, torch SDPA, or megatron's local one.

`policy.attention` picks it (`resolve_attention`): `auto` = TE when `transformer_engine` imports
on CUDA, else `SDPAttention` (torch `scaled_dot_product_attention`: flash / cuDNN kernels) on CUDA,
else the local spec's unfused attention on CPU. Measured on one H100
(benchmarks/megatron_step.py, ~1B dense, 4 x 2048 tokens): SDPA 167 ms/step vs local 316 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_CHOICES", "SDPAttention", "resolve_attention", "te_available"]

#: The values of `policy.attention`.
ATTENTION_CHOICES = ("auto", "te", "sdpa", "local")


def resolve_attention(attention: str, *, cuda: bool) -> str:
    """The attention implementation `policy.attention` names, with `auto` resolved.

    `auto` -> `te` (CUDA + Transformer Engine), `sdpa` (CUDA), `local` (CPU); the others are checked.

    Args:
        attention: one of `ATTENTION_CHOICES`.
        cuda: the model runs on CUDA.

    Returns:
        `te`, `sdpa` or `local`.

    Raises:
        ValueError: an unknown value, or `te` without CUDA and transformer_engine.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if attention == "auto":
        return ("te" if te_available() else "sdpa") if cuda else "local"
    if attention == "te" and not (cuda and te_available()):
        raise ValueError("attention='te' needs CUDA and transformer_engine; use 'sdpa' or 'auto'")
    return attention


def te_available() -> bool:
    """Whether `transformer_engine` imports (any import error counts as unavailable).

    Returns:
        bool: True when `import transformer_engine` succeeds.
    """
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


class SDPAttention(torch.nn.Module):
    """Drop-in for megatron's local `DotProductAttention`: torch `scaled_dot_product_attention`.

    Causal self-attention only (the RL trainer's case); dispatches to flash / memory-efficient
    kernels on CUDA. The constructor takes megatron's `DotProductAttention` arguments (only
    `config.attention_dropout`, `attention_dropout` and `softmax_scale` are used).

    Attributes:
        window: HF sliding-window size W as a banded causal mask (set on a subclass by
            `model.layer_spec`); None: full causal attention.
    """

    window: int | None = None

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        """Take megatron-core's core-attention arguments (`build_module` passes them all).

        Args:
            config: megatron-core's `TransformerConfig` (`attention_dropout`).
            layer_number (int): the layer (megatron-core's signature; unused).
            attn_mask_type: megatron-core's mask type (unused: the mask is causal, or banded by `window`).
            attention_type (str): `self` (megatron-core's signature; unused).
            attention_dropout (float | None): dropout probability; None takes the config's.
            softmax_scale (float | None): the scale of q·k; None = 1/sqrt(d).
            cp_comm_type (str | None): context-parallel communication (unused: CP is refused).
            pg_collection: process groups (megatron-core's signature; unused).
        """
        super().__init__()
        self.config = config
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """Causal attention of `[s, b, heads, d]` queries over `[s, b, groups, d]` keys/values.

        `attention_mask` is ignored (the mask is causal, or banded with `window`); dropout applies
        in training mode only.

        Args:
            query (torch.Tensor): `[s, b, heads, d]`.
            key (torch.Tensor): `[s, b, groups, d]` (GQA: heads is a multiple of groups).
            value (torch.Tensor): `[s, b, groups, d]`.
            attention_mask: ignored.
            attn_mask_type: ignored.
            attention_bias: ignored (megatron-core's signature).
            packed_seq_params: ignored (no packed sequences).

        Returns:
            `[s, b, heads * d]` in the inputs' dtype.
        """
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

