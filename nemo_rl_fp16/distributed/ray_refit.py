"""Refit under Ray: trainer rank 0 pushes buckets straight to the rollout engines; the driver holds no weights.

Order of one refit (`RayRolloutGroup.refit_from`, called by the loop's `RLTrainer.refit`):

1. every trainer rank frees its cached accelerator memory (`free_cache`: `gc` + `empty_cache`);
2. colocated engines wake their **weights** only (`wake_up(["weights"])`; vLLM sleep mode), the KV
   cache stays freed until the next `generate`;
3. every trainer rank runs `push_weights`: each checks its own shards for NaN/inf (or values
   beyond the rollout dtype) and the ranks agree (`all_reduce`) before anything is sent; then
   the policy's weight stream (`rollout_stream`: Megatron gathers each piece to rank 0 only,
   `policy/megatron/refit_stream.py`; the torch backend each FSDP2 parameter to rank 0 only, LoRA
   merged per weight, `policy/torch_refit_stream.py`; an engine without a stream:
   `rollout_state_dict` on rank 0) is packed on
   rank 0 into buckets of the rollout dtype (`rollout.refit.iter_buckets`, cast on the trainer's
   device) and each bucket goes to every engine through Ray's object store (one `ray.put` per
   bucket, read by all engines; the next bucket is made only after all engines loaded this one);
4. the engines finish (`end_refit`: every weight must have come).

The driver only gets `(bytes, transport)` back. Transport logged as `refit/mode` = `ray` (5).
Not done: a NCCL broadcast group between rank 0 and the engines (`rollout.refit.broadcast_bucket`
exists and is tested on gloo, not wired here), and CUDA IPC from rank 0 to a colocated engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nemo_rl_fp16.guards import NonFiniteError, nonfinite_tensors


def free_cache() -> None:
    """Return this process's cached accelerator memory before a colocated engine wakes (no-op on CPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def checked_stream(policy: Any, step: int, dtype: torch.dtype, dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's rollout weights as `(HF name, fp32 tensor)` on rank `dst`, checked first; a collective.

    `MegatronPolicy` and `TorchPolicy` stream piece by piece (`rollout_stream`) after every rank
    checked its own shards (`_fp32_named_params`; LoRA: the merged weights, one at a time); any
    other `PolicyEngine` gives its `rollout_state_dict()` (FSDP: a collective, the
    full copy on `dst` only), checked on `dst`. The ranks agree on the outcome (`all_reduce`)
    before anything is sent, so all raise together.

    Args:
        policy: the rank's policy engine.
        step: the RL step (for the message).
        dtype: the rollout dtype; values beyond its range count as inf.
        dst: the global rank that sends to the engines.

    Returns:
        An iterator every rank must exhaust; it yields only on `dst`.

    Raises:
        NonFiniteError: some rank holds a NaN/inf (or out-of-range) weight; nothing was sent.
    """
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else 0
    limit = torch.finfo(dtype).max if dtype != torch.float32 else None
    if hasattr(policy, "rollout_stream"):
        bad = nonfinite_tensors(policy._fp32_named_params(), limit)  # this rank's own shards
        stream = None
    else:
        state = policy.rollout_state_dict()
        bad = nonfinite_tensors(state, limit) if me == dst else []
        stream = iter(state.items()) if me == dst else iter(())
    count = torch.tensor([len(bad)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(count)
    if int(count.item()):
        raise NonFiniteError(f"refit refused at step {step}: {int(count.item())} weight tensor(s) are non-finite (or "
                             f"beyond {dtype} range){', e.g. ' + ', '.join(bad[:3]) if bad else ' on other ranks'}; "
                             "the policy diverged (lower policy.lr, check the data); nothing was sent")
    return policy.rollout_stream(dst) if stream is None else stream


def push_weights(policy: Any, engines: list, dtype: torch.dtype, bucket_bytes: int, step: int) -> tuple[int, str]:
    """One refit from this trainer rank (run on every rank at once; rank 0 sends).

    Args:
        policy: the rank's policy engine.
        engines: `RolloutWorker` actor handles (they expose `refit_begin` / `refit_bucket` / `refit_end`).
        dtype: the rollout dtype the buckets are cast to.
        bucket_bytes: bucket size in bytes (`rollout.refit_bucket_mb`).
        step: the RL step (for the non-finite message).

    Returns:
        `(bytes sent to all engines together, "ray")` on rank 0 ("restart" when an engine restarted
        to take them), `(0, "ray")` elsewhere.

    Raises:
        NonFiniteError: a weight is NaN/inf or beyond `dtype` (`checked_stream`); nothing was sent.
    """
    import ray
    import torch.distributed as dist

    from nemo_rl_fp16.rollout.refit import iter_buckets

    stream = checked_stream(policy, step, dtype, 0)
    me = dist.get_rank() if dist.is_initialized() else 0
    if me != 0:
        for _ in stream:  # the collectives of the stream; nothing arrives here
            pass
        return 0, "ray"
    ray.get([e.refit_begin.remote() for e in engines])
    sent = 0
    for bucket in iter_buckets(stream, dtype, bucket_bytes):
        ref = ray.put((bucket.meta.to_wire(), bucket.buffer.cpu()))  # one object-store copy for all engines
        ray.get([e.refit_bucket.remote(ref) for e in engines])
        sent += bucket.meta.nbytes * len(engines)
        del bucket, ref
    ends = ray.get([e.refit_end.remote() for e in engines])
    return sent, "restart" if any(mode == "restart" for _, mode in ends) else "ray"
