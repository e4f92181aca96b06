"""megatron-core parallel state for the megatron backend: process group, TP/PP/EP groups, RNG, DP.

`init_megatron_parallel` starts `torch.distributed` when nobody has (single process on a free
local port, or from torchrun's `RANK` / `WORLD_SIZE`), then megatron's model-parallel groups and
its model-parallel RNG. The data-parallel size is what is left: `world / (TP * PP)`.
megatron-core on CPU also needs a few CUDA calls redirected (`cpu_rehearsal.py`; the policy turns
them on for a CPU process).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

from nemo_rl_fp16.policy.micro_batches import DataParallel

__all__ = ["data_parallel", "init_megatron_parallel"]


def init_megatron_parallel(tp: int = 1, pp: int = 1, ep: int = 1, *, seed: int = 0, cpu: bool = False) -> None:
    """Start torch.distributed (single-process if not launched by torchrun), megatron's groups and RNG.

    Args:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size (expert tensor parallelism is 1).
        seed: seed of megatron's model-parallel RNG tracker (`model_parallel_cuda_manual_seed`).
        cpu: gloo instead of NCCL, and no `torch.cuda.set_device`.

    Raises:
        RuntimeError: megatron's parallel state is already initialised with other sizes.
    """
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



def data_parallel() -> DataParallel:
    """The data-parallel rank, size and group in megatron's parallel state (each DP rank trains its rows).

    Returns:
        `DataParallel(rank, size, group)` from `megatron.core.parallel_state`.
    """
    from megatron.core import parallel_state as ps

    return DataParallel(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group())
