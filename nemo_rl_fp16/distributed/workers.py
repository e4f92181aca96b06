"""The Ray actors behind `ray_engines`: one trainer rank (`PolicyWorker`) or one rollout engine (`RolloutWorker`).

Each actor builds its engine in its own process from the recipe (`policy.build_policy`,
`rollout.build_rollout_engine`) and answers the group objects of `ray_engines`, which fan the
loop's protocol calls out to them. Results come back on the CPU (`_cpu`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from pathlib import Path
from typing import Any

import torch

from nemo_rl_fp16.config import RecipeConfig
from nemo_rl_fp16.precision import PrecisionPolicy


def _cpu(obj: Any) -> Any:
    """Tensors (nested in dicts, lists, dataclasses) moved to the CPU, for the trip to the driver."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


class PolicyWorker:
    """One trainer rank (wrapped with `ray.remote` by `RayEngines`).

    Holds the policy and, with `algorithm.kl_coef > 0`, the frozen reference policy, sharded the
    same way on the same ranks.
    """

    def __init__(self, threads: int):
        """Limit torch to `threads` intra-op threads (the actor's CPUs).

        Args:
            threads (int): torch intra-op threads (at least 1).
        """
        torch.set_num_threads(max(1, threads))
        self.engines: dict[str, Any] = {}

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's address for torch.distributed's TCP store.

        Returns:
            tuple[str, int]: the node's IP address and a port that was free when asked.
        """
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, rank: int, world: int, addr: str, port: int, backend: str, rc: RecipeConfig, model_cfg: dict,
              train_pol: PrecisionPolicy, device: str, init: dict | None, reference: bool = False) -> str:
        """Join the process group as `rank` of `world`, then build the policy (and reference) engine.

        Args:
            rank (int): this worker's rank.
            world (int): the number of trainer ranks.
            addr (str): rank 0's IP (`rendezvous`).
            port (int): rank 0's free port.
            backend (str): `gloo` (CPU) or `nccl` (GPU).
            rc (RecipeConfig): the typed recipe.
            model_cfg (dict): the recipe's `model:` block.
            train_pol (PrecisionPolicy): the trainer side's dtypes.
            device (str): `cpu` or `cuda`.
            init (dict | None): fp32 starting weights (None = `model.name_or_path`).
            reference (bool): also build the frozen, forward-only reference policy (`policy.reference`).

        Returns:
            str: the engine's class name (for the driver's log line).
        """
        import torch.distributed as dist

        from nemo_rl_fp16.policy import build_policy

        os.environ.setdefault("LOCAL_RANK", "0")  # Ray shows each actor only its own GPU
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        self.engines["policy"] = build_policy(rc, model_cfg, train_pol, device, init)
        if reference:
            from nemo_rl_fp16.policy.reference import build_reference

            self.engines["reference"] = build_reference(rc, model_cfg, train_pol, device, init)
        return type(self.engines["policy"]).__name__

    def call(self, target: str, method: str, *args: Any) -> Any:
        """`engines[target].method(*args)`, tensors of the answer moved to the CPU.

        Args:
            target (str): `policy` or `reference`: which engine of this rank.
            method (str): the engine method's name.
            *args (Any): its arguments.

        Returns:
            Any: the method's answer with every tensor in it on the CPU.
        """
        return _cpu(getattr(self.engines[target], method)(*args))

    def free_cache(self) -> None:
        """Free cached accelerator memory before a colocated engine wakes (`ray_refit.free_cache`)."""
        from nemo_rl_fp16.distributed.ray_refit import free_cache

        free_cache()

    def push_weights(self, engines: list, dtype: torch.dtype, bucket_bytes: int, step: int) -> tuple[int, str]:
        """This rank's part of a refit (`ray_refit.push_weights`: rank 0 sends buckets to `engines`).

        Args:
            engines: the `RolloutWorker` handles.
            dtype: the rollout dtype.
            bucket_bytes: the bucket size in bytes.
            step: the RL step.

        Returns:
            `(bytes sent, "ray")` on rank 0, `(0, "ray")` elsewhere.
        """
        from nemo_rl_fp16.distributed.ray_refit import push_weights

        return push_weights(self.engines["policy"], engines, dtype, bucket_bytes, step,
                            getattr(self, "refit_group", None))

    def push_ipc(self, engine: Any, dtype: torch.dtype, bucket_bytes: int, step: int, device: str) -> tuple[int, str]:
        """This rank's part of an `ipc` refit (`ray_ipc_refit.push_ipc`): buckets to the engine on its bundle by handle.

        Args:
            engine: the `RolloutWorker` handle sharing this rank's bundle, or None.
            dtype: the rollout dtype.
            bucket_bytes: the bucket size in bytes.
            step: the RL step.
            device: `cuda` or `cpu`.

        Returns:
            `(bytes this rank's engine loaded, "cuda_ipc" | "shm" | "restart")`.
        """
        from nemo_rl_fp16.distributed.ray_ipc_refit import push_ipc

        return push_ipc(self.engines["policy"], engine, dtype, bucket_bytes, step, device)

    def refit_group_join(self, addr: str, port: int, world: int, backend: str) -> None:
        """Host the refit broadcast group as member 0 (rank 0 only; `ray_refit.open_group`).

        Args:
            addr: this node's address (from `rendezvous`).
            port: the free port `rendezvous` found.
            world: members in all.
            backend: "nccl" or "gloo".
        """
        from nemo_rl_fp16.rollout.refit import RefitGroup

        self.refit_group = RefitGroup(addr, port, 0, world, backend)

    def close(self) -> None:
        """Leave the process group."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RolloutWorker:
    """One rollout engine (wrapped with `ray.remote` by `RayEngines`)."""

    def __init__(self, threads: int):
        """Limit torch to `threads` intra-op threads (the actor's CPUs).

        Args:
            threads (int): torch intra-op threads (at least 1).
        """
        torch.set_num_threads(max(1, threads))
        self.engine = None

    def setup(self, rc: RecipeConfig, rollout_pol: PrecisionPolicy, model_cfg: dict, tokenizer: Any, device: str,
              init: dict | None, model_dir: str) -> str:
        """Build this worker's rollout engine (`rollout.build_rollout_engine`); returns its class name.

        Args:
            rc (RecipeConfig): the typed recipe.
            rollout_pol (PrecisionPolicy): the rollout side's dtypes.
            model_cfg (dict): the recipe's `model:` block.
            tokenizer (Any): the run's tokenizer.
            device (str): `cpu` or `cuda`.
            init (dict | None): fp32 starting weights (HF names); None = `model.name_or_path`.
            model_dir (str): where vLLM's HF folder of a config-built model is written.

        Returns:
            str: the engine's class name (e.g. `TorchRolloutEngine`).
        """
        from nemo_rl_fp16.rollout import build_rollout_engine

        self.engine = build_rollout_engine(rc, rollout_pol, model_cfg, tokenizer, device, initial_state_dict=init,
                                           model_dir=Path(model_dir))
        return type(self.engine).__name__

    def call(self, method: str, *args: Any) -> Any:
        """`engine.method(*args)`, tensors of the answer moved to the CPU.

        Args:
            method (str): the engine method's name.
            *args (Any): its arguments.

        Returns:
            Any: the method's answer with every tensor in it on the CPU.
        """
        return _cpu(getattr(self.engine, method)(*args))

    def sleep(self) -> bool:
        """Free the engine's accelerator memory while trainers run (False: the engine cannot).

        Returns:
            bool: True when the engine released its memory (it wakes on the next call).
        """
        return bool(self.engine.sleep()) if hasattr(self.engine, "sleep") else False

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reload what `sleep` freed; a no-op for an engine that cannot sleep.

        Args:
            tags: only these (vLLM's `["weights"]` before a refit); None = everything.
        """
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up(tags) if tags is not None else self.engine.wake_up()

    def refit_begin(self) -> None:
        """Start a bucketed refit pushed by trainer rank 0 (`engine.begin_refit`)."""
        self.engine.begin_refit()

    def refit_bucket(self, bucket: tuple[dict, torch.Tensor]) -> int:
        """Load one bucket pushed by trainer rank 0 (`engine.load_bucket`).

        Args:
            bucket: `(BucketMeta.to_wire(), flat uint8 buffer)`.

        Returns:
            The bucket's bytes.
        """
        return self.engine.load_bucket(*bucket)

    def refit_ipc(self, meta: dict, handle: dict, mode: str) -> int:
        """Open a bucket's handle from the trainer rank on this bundle and load it in place (`ray_ipc_refit.receive_handle`).

        Args:
            meta: `BucketMeta.to_wire()`.
            handle: `refit.cuda_ipc_handle` or `refit.shm_handle` of the bucket (str, bytes, ints).
            mode: `cuda_ipc` or `shm`.

        Returns:
            The bytes loaded; the sender releases the bucket once this returns.
        """
        from nemo_rl_fp16.distributed.ray_ipc_refit import receive_handle

        return receive_handle(self.engine, meta, handle, mode)

    def refit_group_size(self) -> int:
        """Receivers this engine adds to the refit broadcast group (vLLM: its workers; else 1).

        Returns:
            The number of members it joins with.
        """
        return int(self.engine.refit_group_size()) if hasattr(self.engine, "refit_group_size") else 1

    def refit_group_join(self, addr: str, port: int, first: int, world: int, backend: str) -> None:
        """Join trainer rank 0's refit broadcast group (`ray_refit.open_group`): vLLM workers inside vLLM, else here.

        Args:
            addr: trainer rank 0's address.
            port: its refit store's port.
            first: this engine's first member rank.
            world: members in all.
            backend: "nccl" or "gloo".
        """
        from nemo_rl_fp16.rollout.refit import RefitGroup

        joined = hasattr(self.engine, "join_refit_group") and self.engine.join_refit_group(addr, port, first, world,
                                                                                             backend)
        self.refit_group = None if joined else RefitGroup(addr, port, first, world, backend)

    def refit_receive(self) -> tuple[int, str]:
        """Receive one broadcast refit and finish it (`ray_refit.receive_buckets`), after `refit_begin`.

        Returns:
            `(bytes received, "broadcast")`, or "restart" when the engine restarted to take them.
        """
        from nemo_rl_fp16.distributed.ray_refit import receive_buckets

        return receive_buckets(self.engine, self.refit_group)

    def refit_end(self) -> tuple[int, str]:
        """Finish the refit (every weight must have come).

        Returns:
            The bytes the engine counted since `refit_begin`, and "restart" when the engine
            restarted to take them (a vLLM engine whose self-check failed), else "ray".
        """
        n = self.engine.end_refit()
        return n, "restart" if getattr(self.engine, "last_refit_transport", None) == "restart" else "ray"
