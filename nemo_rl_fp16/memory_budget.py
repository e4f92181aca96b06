"""The run's memory budget per GPU and per host, and the refusal of a layout that does not fit.

From the recipe alone (no model is built): the trainer rank's figures (`policy.memory`:
megatron or the torch backend), the forward-only KL reference (`policy/reference.py`: weights in
`param_dtype` only, on the trainer's GPUs), the refit buffers (`rollout/refit.py`: the sending
rank holds the bucket being filled and the gathered piece it is cut from, ~1.5 buckets of
`rollout.refit_bucket_mb`; under Ray with the `object_store` transport each bucket also lands in
the object store of the sender's node and of each engine's node, `distributed/ray_refit.py`; with
`ipc` every trainer rank holds one relayed bucket on its own device, in host shared memory on CPU,
`distributed/ray_ipc_refit.py`) and the rollout engine's share
(vLLM: `rollout.gpu_memory_utilization` of each of its GPUs; colocated it shares the trainer's
GPUs and sleeps while they train, its weights offloaded to host memory).

A trainer GPU goes through three phases; its peak is the largest:
- train: weights + grads + optimizer + activations + logits + reference (+ a colocated torch
  rollout engine's weights);
- refit (sending rank): what stays between steps (weights, optimizer, megatron's grad buffer,
  reference) + the refit buffers (+ a colocated vLLM engine's weights, woken for the refit);
- rollout (colocated vLLM): what stays + `gpu_memory_utilization` x the GPU.

`cluster.gpu_memory_gb` (GiB, as torch reports a GPU's total memory; 0 = unknown) is the GPU the
peak must fit: `memory_problems` names the largest item of the phase that does not fit and the key
that shrinks it, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nemo_rl_fp16.config import RecipeConfig
from nemo_rl_fp16.policy.memory import GIB, estimate_memory, estimate_torch_memory, model_layout

if TYPE_CHECKING:
    from nemo_rl_fp16.modeling.layout import ModelLayout
    from nemo_rl_fp16.plan import Layout

def fmt_gib(x: float) -> str:
    """Bytes as GiB with one decimal, or MiB below 1 GiB (`12.3 GiB`, `4.2 MiB`).

    Args:
        x (float): a size in bytes.

    Returns:
        str: the size in GiB (2**30 bytes) or MiB (2**20), one decimal.
    """
    return f"{x / GIB:.1f} GiB" if x >= GIB else f"{x / 2**20:.1f} MiB"


#: the refit's sending rank holds the bucket being filled plus the gathered piece it is cut from
REFIT_BUCKETS_ON_SENDER = 1.5


@dataclass
class Phase:
    """One phase of a GPU: named items in bytes, each with the recipe key that shrinks it."""

    name: str
    items: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def add(self, item: str, nbytes: float, key: str) -> None:
        """Add an item (skipped when 0).

        Args:
            item (str): the item's name in the plan (`weights`, `optimizer`, ...).
            nbytes (float): its size in bytes.
            key (str): the recipe key (with the value to set) that shrinks it.
        """
        if nbytes > 0:
            self.items[item], self.keys[item] = nbytes, key

    @property
    def total(self) -> float:
        """Bytes of the phase (the sum of its items)."""
        return sum(self.items.values())

    def largest(self) -> str:
        """The name of the largest item.

        Returns:
            str: the item with the most bytes.
        """
        return max(self.items, key=self.items.__getitem__)


@dataclass
class MemoryBudget:
    """A run's memory figures (bytes): the trainer GPU's phases, a rollout GPU's, each host's.

    Attributes:
        trainer: the trainer GPU's phases (the sending rank's: it holds the refit buffers too).
        rollout: a rollout GPU's phase (split layout; None when the engine shares the trainer GPUs).
        hosts: one line per kind of node: its GPUs' sum and the host RAM the package holds.
        gpu_bytes: `cluster.gpu_memory_gb` in bytes (0: unknown).
        alternative: the trainer GPU's train phase with `policy.use_distributed_optimizer` flipped
            (megatron), for the plan line; None otherwise.
        distributed_optimizer: whether megatron's distributed optimizer is on.
    """

    trainer: list[Phase]
    rollout: Phase | None
    hosts: list[str]
    gpu_bytes: float
    alternative: float | None
    distributed_optimizer: bool
    rollout_weights: float = 0.0

    def peak(self) -> Phase:
        """The trainer GPU's largest phase.

        Returns:
            Phase: the phase with the most bytes.
        """
        return max(self.trainer, key=lambda p: p.total)


def _local_estimate(cfg: RecipeConfig, lay: ModelLayout, layout: Layout, param_bytes: int, seq: int,
                    dist_opt: bool):
    p = cfg.policy
    positions = min(cfg.rollout.max_new_tokens + 1, seq)  # the response positions' logits only
    if p.backend == "megatron":
        return estimate_memory(lay, tp=layout.tp, pp=layout.pp, ep=layout.ep, dp=layout.dp, param_bytes=param_bytes,
                               micro_batch=p.micro_batch_size, seq=seq, sequence_parallel=p.sequence_parallel,
                               recompute=p.activation_checkpointing, logit_positions=positions)
    return estimate_torch_memory(lay, dp=layout.dp, param_bytes=param_bytes, micro_batch=p.micro_batch_size,
                                 seq=seq, recompute=p.activation_checkpointing, logit_positions=positions)


def lora_parameters(lay: ModelLayout, rank: int, targets: list[str]) -> int:
    """LoRA adapter parameters: `rank x (in + out)` per targeted projection per layer.

    Args:
        lay (ModelLayout): the model layout.
        rank (int): `policy.lora.rank`.
        targets (list[str]): `policy.lora.target_modules` (HF projection names; another name counts `2h`).

    Returns:
        int: adapter parameters over all layers (MoE: one expert's MLP per target, a lower figure).
    """
    h, q, kv = lay.hidden_size, lay.num_heads * lay.head_dim, lay.num_kv_heads * lay.head_dim
    ffn = lay.moe_ffn_hidden_size if lay.is_moe else lay.ffn_hidden_size
    dims = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h, "gate_proj": h + ffn,
            "up_proj": h + ffn, "down_proj": ffn + h}
    return lay.num_layers * rank * sum(dims.get(t, 2 * h) for t in targets)


def _shrink_keys(cfg: RecipeConfig, lay: ModelLayout, layout: Layout, dist_opt: bool) -> dict[str, str]:
    """The recipe key that shrinks each trainer item (the one the refusal names)."""
    p = cfg.policy
    if p.backend == "megatron":
        n = lay.num_parameters()
        model = ("policy.expert_parallel_size" if lay.is_moe and n["experts"] / layout.ep > n["total"] - n["experts"]
                 else "policy.tensor_parallel_size")
        more_dp = ("cluster.ray.trainer_workers" if cfg.cluster.ray.enabled else "cluster.nodes") + \
            " (more data-parallel ranks shard it further)"
        opt = more_dp if dist_opt else "policy.use_distributed_optimizer=true"
        logits = "policy.tensor_parallel_size"
    else:
        model = opt = ("cluster.ray.trainer_workers" if cfg.cluster.ray.enabled else "cluster.gpus_per_node") + \
                      " (FSDP2 shards over data-parallel ranks)"
        logits = "policy.micro_batch_size"
    acts = "policy.micro_batch_size" if p.activation_checkpointing else "policy.activation_checkpointing=true"
    return {"weights": model, "grads": model, "optimizer": opt, "activations": acts, "logits": logits,
            "reference": model, "refit buffers": "rollout.refit_bucket_mb",
            "vLLM": "rollout.gpu_memory_utilization", "rollout engine (torch)": "rollout.max_new_tokens"}


def plan_memory(cfg: RecipeConfig, layout: Layout, device: str) -> MemoryBudget | str:
    """The run's memory budget, or why none can be made.

    Args:
        cfg (RecipeConfig): the typed recipe.
        layout (Layout): the trainer's parallel layout (`plan.parallel_layout`).
        device (str): the run's device (`plan.run_device`).

    Returns:
        MemoryBudget | str: the budget, or a one-line reason (the model's layout is unknown).
    """
    from nemo_rl_fp16.policy.factory import distributed_optimizer
    from nemo_rl_fp16.precision import resolve_policies

    param_bytes = resolve_policies(cfg.precision.model_dump())[0].param_dtype.itemsize

    lay, source = model_layout(cfg.model)
    if lay is None:
        return f"unknown ({source})"
    p, r, ray = cfg.policy, cfg.rollout, cfg.cluster.ray
    seq = min(r.max_new_tokens + 1024, lay.max_position_embeddings)
    dist = p.backend == "megatron" and distributed_optimizer(p.use_distributed_optimizer, device)
    m = _local_estimate(cfg, lay, layout, param_bytes, seq, dist)
    if p.backend == "torch" and p.lora.enabled:  # frozen base: grads and Adam state of the adapters only
        import dataclasses

        adapters = lora_parameters(lay, p.lora.rank, p.lora.target_modules)
        m = dataclasses.replace(m, grads=(4 + param_bytes) * adapters, optimizer=8 * adapters,
                                optimizer_distributed=8 * adapters)
    keys = _shrink_keys(cfg, lay, layout, dist)
    gpu = cfg.cluster.gpu_memory_gb * GIB if device == "cuda" else 0.0  # off CUDA: nothing to check against
    optimizer = m.optimizer_distributed if dist else m.optimizer
    model_bytes = lay.num_parameters()["total"] * param_bytes  # the whole model in the rollout/param dtype
    reference = m.params_local * param_bytes if cfg.algorithm.kl_coef > 0 else 0.0
    if p.backend == "torch":  # the torch reference is not FSDP-sharded (`policy/reference.py`)
        reference = model_bytes if cfg.algorithm.kl_coef > 0 else 0.0
    colocated = not ray.enabled or ray.layout == "colocated"
    vllm = r.backend == "vllm"
    fsdp = p.backend == "torch" and layout.dp > 1
    # the sending rank holds ~1.5 buckets; an FSDP2 sender also gathers one fp32 parameter at a time
    # (`policy/torch_refit_stream.py`), the largest being the embedding
    refit = REFIT_BUCKETS_ON_SENDER * r.refit_bucket_mb * 2**20 if vllm else 0.0
    if vllm and fsdp:
        refit += 4 * lay.vocab_size * lay.hidden_size
    torch_engine = model_bytes if r.backend == "torch" and colocated and device == "cuda" else 0.0

    train = Phase("train")
    for item, nbytes in (("weights", m.weights), ("grads", m.grads), ("optimizer", optimizer),
                         ("activations", m.activations), ("logits", m.logits), ("reference", reference),
                         ("rollout engine (torch)", torch_engine)):
        train.add(item, nbytes, keys[item])
    stay = Phase("refit")
    for item in ("weights", "optimizer", "reference", "rollout engine (torch)"):
        stay.add(item, train.items.get(item, 0.0), keys[item])
    if p.backend == "megatron":  # megatron's DDP grad buffer persists; the torch backend frees its grads
        stay.add("grads", m.grads, keys["grads"])
    refit_phase = Phase("refit", dict(stay.items), dict(stay.keys))
    refit_phase.add("refit buffers", refit, keys["refit buffers"])
    phases = [train, refit_phase]
    rollout_phase = None
    if vllm and colocated:
        refit_phase.add("vLLM weights", model_bytes / r.tensor_parallel_size,  # woken for the refit
                        "rollout.tensor_parallel_size")
        if gpu:
            phases.append(Phase("rollout", {**stay.items, "vLLM": r.gpu_memory_utilization * gpu},
                                {**stay.keys, "vLLM": keys["vLLM"]}))
    elif vllm:
        rollout_phase = Phase("rollout")
        rollout_phase.add("vLLM", r.gpu_memory_utilization * gpu, keys["vLLM"])
    alternative = None
    if p.backend == "megatron":
        alternative = train.total - optimizer + (m.optimizer if dist else m.optimizer_distributed)
    budget = MemoryBudget(phases, rollout_phase, [], gpu, alternative, dist, model_bytes / r.tensor_parallel_size)
    budget.hosts = _host_lines(cfg, layout, budget, model_bytes, device)
    return budget


def _host_lines(cfg: RecipeConfig, layout: Layout, b: MemoryBudget, model_bytes: float, device: str) -> list[str]:
    """Per node: its GPUs' sum (trainer GPUs first, then rollout GPUs, node by node) and host RAM."""
    ray, r = cfg.cluster.ray, cfg.rollout
    per_node = max(cfg.cluster.gpus_per_node, 1)
    colocated = not ray.enabled or ray.layout == "colocated"
    trainer_gpus = layout.world_size
    rollout_gpus = 0 if colocated or r.backend != "vllm" else ray.rollout_workers * r.tensor_parallel_size
    engines = (ray.rollout_workers if ray.enabled else 1) if r.backend == "vllm" else 0
    bucket = r.refit_bucket_mb * 2**20 if r.backend == "vllm" else 0.0
    transport = "object_store"
    if ray.enabled:
        from nemo_rl_fp16.distributed.ray_refit import choose_transport

        try:
            transport = choose_transport(r.refit_transport, device, ray.layout)
        except ValueError:  # refused by the validation stage (`plan.parallel_layout`) with its own line
            transport = "object_store"
    t_peak, v_gpu = b.peak().total, (b.rollout.items.get("vLLM", 0.0) if b.rollout else 0.0)
    lines: list[str] = []
    seen: dict[str, list[int]] = {}
    slots = ["t"] * trainer_gpus + ["v"] * rollout_gpus
    for i in range(0, max(len(slots), 1), per_node):
        node = slots[i:i + per_node]
        nt, nv = node.count("t"), node.count("v")
        node_engines = (nv // r.tensor_parallel_size) if not colocated else (
            engines * nt // max(trainer_gpus, 1))
        host = 0.0
        parts = []
        if ray.enabled and bucket and transport == "object_store":  # the sender's node and each engine's node
            copies = (1 if i == 0 else 0) + (1 if node_engines else 0)
            if copies:
                host += copies * bucket
                parts.append(f"refit bucket x {copies} (Ray object store) {fmt_gib(copies * bucket)}")
        if ray.enabled and bucket and transport == "ipc" and device == "cpu" and nt:  # one relayed bucket per rank
            host += nt * bucket
            parts.append(f"refit bucket x {nt} (shared memory) {fmt_gib(nt * bucket)}")
        if colocated and r.backend == "vllm" and node_engines:
            host += node_engines * model_bytes
            parts.append(f"vLLM weights asleep {node_engines} x {fmt_gib(model_bytes)}")
        gpu_sum = nt * t_peak + nv * v_gpu
        what = ", ".join(x for x in (f"{nt} trainer GPU{'s' * (nt != 1)} x {fmt_gib(t_peak)}" if nt else "",
                                     f"{nv} vLLM GPU{'s' * (nv != 1)} x {fmt_gib(v_gpu)}" if nv else "") if x)
        line = (f"GPUs {fmt_gib(gpu_sum)} ({what}); host RAM {fmt_gib(host)}"
                + (f" ({'; '.join(parts)})" if parts else ""))
        seen.setdefault(line, []).append(i // per_node)
    for line, nodes in seen.items():
        name = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {nodes[0]}-{nodes[-1]}"
        lines.append(f"{name}: {line}")
    return lines


def memory_lines(b: MemoryBudget | str, cfg: RecipeConfig) -> dict[str, str]:
    """The plan's memory lines.

    Args:
        b (MemoryBudget | str): `plan_memory`'s result.
        cfg (RecipeConfig): the typed recipe.

    Returns:
        dict[str, str]: `memory/GPU` (the trainer GPU's train phase, by item), `memory/peak` (every
            phase and the fit against `cluster.gpu_memory_gb`), `memory/rollout GPU` (split vLLM),
            `memory/host` (one entry per kind of node); or one `memory/GPU` line saying why no
            estimate was made.
    """
    if isinstance(b, str):
        return {"memory/GPU": f"{b}; memory estimate skipped"}
    train = b.trainer[0]
    items = " + ".join(f"{k} {fmt_gib(v)}" for k, v in train.items.items())
    line = f"{items} = {fmt_gib(train.total)}"
    if b.alternative is not None:
        line += (f" (policy.use_distributed_optimizer={str(b.distributed_optimizer).lower()}; "
                 f"{fmt_gib(b.alternative)} with it {'off' if b.distributed_optimizer else 'on'})")
    if cfg.policy.backend == "megatron":
        line += f"; optimizer = fp32 master + Adam{', sharded over DP' if b.distributed_optimizer else ''}"
    out = {"memory/GPU": line}
    phases = ", ".join(f"{p.name} {fmt_gib(p.total)}" for p in b.trainer)
    fit = (f"fits cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g}" if b.gpu_bytes and not memory_problems(b, cfg)
           else "DOES NOT FIT" if b.gpu_bytes else "not checked (cluster.gpu_memory_gb=0: unknown)"
           if not cfg.cluster.gpu_memory_gb else
           f"not checked (cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g} describes the GPUs; this run has none)")
    colocated_vllm = cfg.rollout.backend == "vllm" and not b.rollout
    out["memory/peak"] = (f"trainer rank 0: {phases}; peak {fmt_gib(b.peak().total)} ({b.peak().name}); {fit}"
                          + ("" if b.gpu_bytes or not colocated_vllm else
                             f"; colocated vLLM takes rollout.gpu_memory_utilization="
                             f"{cfg.rollout.gpu_memory_utilization:g} of the GPU while it generates"))
    if b.rollout is not None:
        r = cfg.rollout
        out["memory/rollout GPU"] = (f"vLLM {r.gpu_memory_utilization:g} x {fmt_gib(b.gpu_bytes)} = "
                                     f"{fmt_gib(b.rollout.items['vLLM'])} (weights {fmt_gib(b.rollout_weights)} at TP "
                                     f"{r.tensor_parallel_size}, the rest KV cache)"
                                     if b.gpu_bytes else f"vLLM rollout.gpu_memory_utilization="
                                     f"{r.gpu_memory_utilization:g} of each of its GPUs")
    out["memory/host"] = "; ".join(b.hosts)
    return out


def memory_problems(b: MemoryBudget | str, cfg: RecipeConfig) -> list[str]:
    """Refusals of a layout that does not fit `cluster.gpu_memory_gb`, one line each.

    Args:
        b (MemoryBudget | str): `plan_memory`'s result (a str: no estimate, nothing to refuse).
        cfg (RecipeConfig): the typed recipe.

    Returns:
        list[str]: empty when the GPU memory is unknown (0) or every phase fits; else one line naming
            the phase's total, its largest item and the key that shrinks it.
    """
    if isinstance(b, str) or not b.gpu_bytes:
        return []
    out, have = [], cfg.cluster.gpu_memory_gb
    peak = b.peak()
    if peak.total > b.gpu_bytes:
        big = peak.largest()
        out.append(f"bad value for 'cluster.gpu_memory_gb': {have:g}; the plan needs {fmt_gib(peak.total)} per "
                   f"trainer GPU ({peak.name} phase; largest item: {big} {fmt_gib(peak.items[big])}); allowed: >= "
                   f"{peak.total / GIB:.2f}; shrink {big} with {peak.keys[big]}, or use GPUs with more memory")
    if b.rollout is not None and b.rollout_weights > b.rollout.items.get("vLLM", 0.0):
        r = cfg.rollout
        share = b.rollout.items.get("vLLM", 0.0)
        out.append(f"bad value for 'rollout.gpu_memory_utilization': {r.gpu_memory_utilization:g}; vLLM's weights "
                   f"need {fmt_gib(b.rollout_weights)} per GPU at TP {r.tensor_parallel_size}, more than the "
                   f"{fmt_gib(share)} it may use of a {have:g} GiB GPU (largest item: vLLM weights); allowed: more "
                   f"than {b.rollout_weights / b.gpu_bytes:.2f}; raise it, or rollout.tensor_parallel_size")
    return out
