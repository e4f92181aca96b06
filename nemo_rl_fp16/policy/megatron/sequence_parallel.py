"""Megatron sequence parallelism: which layer spec can run it, and the sequence width it needs.

With `sequence_parallel` the TP ranks split the sequence dimension between the tensor-parallel
regions (norms, dropout, router), so the width of every forward must be a multiple of TP
(megatron's `scatter_to_sequence_parallel_region` splits it evenly; NeMo-RL pads to a multiple of
TP the same way). `MegatronCausalLM` pads each micro-batch on the right with masked tokens to
`padded_width` (trailing padding cannot reach earlier tokens under the causal mask) and drops
those positions again.

Only Transformer Engine's layer spec runs it: the local spec's norm (`WrappedTorchNorm`) asserts
`not config.sequence_parallel` at model build. `sequence_parallel_problem` is the one rule the
validation stage (`plan.megatron_layout_problems`) and the policy's constructor both apply, so the
dry run refuses exactly what the build would.
"""

from __future__ import annotations

from nemo_rl_fp16.policy.megatron import attention
from nemo_rl_fp16.policy.megatron.attention import resolve_attention

__all__ = ["padded_width", "sequence_parallel_problem", "spec_attention"]


def spec_attention(requested: str, *, cuda: bool, sliding_window: int | None = None) -> str:
    """The attention (and so the layer spec) the megatron policy builds for `policy.attention`.

    `auto` with a sliding window on CUDA takes `sdpa` (TE's sliding window is not mapped), then
    `attention.resolve_attention` decides.

    Args:
        requested: `policy.attention` (`auto` | `te` | `sdpa` | `local`).
        cuda: the model runs on CUDA.
        sliding_window: the model's sliding window (None or 0: none).

    Returns:
        `te` (Transformer Engine spec), `sdpa` or `local` (the local spec).

    Raises:
        ValueError: as `resolve_attention` (an unknown value, `te` without CUDA and transformer_engine).
    """
    if requested == "auto" and sliding_window and cuda:
        requested = "sdpa"
    return resolve_attention(requested, cuda=cuda)


def _te_installed() -> bool:
    """`attention.te_available()`, looked up at call time (so a test's stand-in for it is seen)."""
    return attention.te_available()


def sequence_parallel_problem(*, sequence_parallel: bool, tp: int, attention: str) -> str | None:
    """One line when `policy.sequence_parallel=true` cannot run as asked, else None.

    Args:
        sequence_parallel: `policy.sequence_parallel`.
        tp: `policy.tensor_parallel_size`.
        attention: the resolved attention (`spec_attention`): only `te` builds the TE layer spec.

    Returns:
        The refusal line (key, value, allowed values, the fix), or None.
    """
    if not sequence_parallel:
        return None
    head = "bad value for 'policy.sequence_parallel': true; allowed: false"
    if tp < 2:
        return (f"{head} with policy.tensor_parallel_size={tp} (sequence parallelism splits the sequence over "
                "TP ranks; megatron ignores it at TP 1); set policy.sequence_parallel=false or tensor_parallel_size>1")
    if attention != "te" and not _te_installed():  # the environment, not the recipe: say what to install
        return ("policy.sequence_parallel=true needs Transformer Engine (megatron's local layer spec norm, "
                "WrappedTorchNorm, refuses sequence parallelism), which is not installed; install transformer_engine "
                "on the CUDA nodes (policy.attention=auto|te), or set policy.sequence_parallel=false")
    if attention != "te":
        return (f"{head} with policy.attention resolving to '{attention}' (the local layer spec's norm, megatron's "
                "WrappedTorchNorm, refuses sequence parallelism: it needs Transformer Engine on CUDA); install "
                "transformer_engine with policy.attention=auto|te, or set policy.sequence_parallel=false")
    return None


def padded_width(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (the TP size under sequence parallelism, else 1).

    Args:
        width: the micro-batch's sequence width (prompt + response tokens).
        multiple: the multiple it must be (>= 1).

    Returns:
        The smallest multiple of `multiple` that is >= `width`.
    """
    return -(-int(width) // int(multiple)) * int(multiple)
