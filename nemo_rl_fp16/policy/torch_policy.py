"""`TorchPolicy`: the HF/torch policy π with fp32 master weights and fp16/bf16 compute.

Layout (what FSDP's `MixedPrecisionPolicy(param_dtype=...)` and Megatron's fp16 optimizer do,
deliberately *not* autocast): an fp32 master model owns the parameters and the AdamW state; a
compute copy in `policy.param_dtype` runs forward and backward. Each step casts master ->
compute, backpropagates `loss * scale` through the compute copy micro-batch by micro-batch,
accumulates each micro-batch's low-precision gradients in `grad_reduce_dtype` (fp32, as FSDP's
`reduce_dtype` and Megatron's main_grad do), unscales them into fp32 master `.grad` (dividing in
fp32), and either skips the step (any inf/nan: weights and optimizer state untouched, loss scale
backed off per hysteresis) or clips and steps. When `param_dtype` is fp32 the compute copy *is*
the master (no copy).

Optional multi-GPU: with torch.distributed initialised and world size > 1 the master is wrapped
with FSDP2 `fully_shard` + `MixedPrecisionPolicy(param_dtype, reduce_dtype=grad_reduce_dtype)`,
which then plays the compute copy's role (see `_fsdp_wrap`). Data parallel: every rank receives
the whole batch, scores and trains its own equal slice of the rows, and returns the full-batch
result (log-probs, losses and metrics gathered). Gradients must be summed over ranks, since the
loop's loss closure already weights each row by its share of the global batch: FSDP averages in
fp32 and the unscale multiplies the world size back (gloo has no pre-multiplied sum).
Checkpoints use full (unsharded) model and optimizer state dicts.

Optional LoRA (`lora={"enabled": True, "rank", "alpha", "target_modules"}`, the recipe's
`policy.lora`): the fp32 master is wrapped with peft `LoraConfig(r, lora_alpha, target_modules)`
before the compute copy is made, so the base weights are frozen in both copies, only the adapters
get gradients (in the policy precision, unscaled into fp32 master adapters) and the optimizer
holds the adapters only. `rollout_state_dict()` returns the merged fp32 weights (W + scale*B@A)
under the base model's HF names, which is what the rollout engine loads. Single process only.

MoE models (HF Qwen2-MoE, Qwen3-MoE, Mixtral; `moe_routing`): `logprobs` records the experts the
trainer's own routers pick for each response token (`selected_experts`, compared with the rollout's
for `mismatch/router_topk_flip_rate`). With `router_replay="rollout"` (R3) every scoring forward —
the log-probs the loss uses and each training micro-batch — routes the response tokens to
`batch.rollout_experts` (sliced with the rows, so micro-batching, the data-parallel split, overflow
retries and repeated updates all see the same indices) with routing weights from the trainer's own
gate probabilities, so the gate still gets gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, TrainStepResult
from nemo_rl_fp16.modeling import (
    build_model,
    cast_params_,
    decoder_layers,
    load_weights_,
    position_ids_from_mask,
    response_logprobs,
)
from nemo_rl_fp16.modeling.moe_routing import RouterHooks, replay_targets, response_experts
from nemo_rl_fp16.precision import DynamicLossScaler, PrecisionPolicy, audit_model, dtype_name
from nemo_rl_fp16.precision.cpu_numerics import cpu_numerics
from nemo_rl_fp16.precision.range_monitor import ActivationMonitor

GradHook = Callable[[list[torch.Tensor]], None]


class TorchPolicy:
    """PolicyEngine over an HF causal LM (see module doc for the precision layout).

    Args:
        model_cfg: the recipe's `model:` block (see `modeling.build_model`).
        policy: the trainer-side precision policy.
        lr, weight_decay, max_grad_norm: AdamW and clipping (`max_grad_norm <= 0`: no clipping).
        micro_batch_size: rows per forward/backward; gradients accumulate across micro-batches.
        seed: seeds the random init of a `config`-built model (`modeling.build_model`).
        device: torch device of both copies.
        initial_state_dict: fp32 HF state dict to start from (e.g. after a warm start).
        lora: the recipe's `policy.lora` block; when `enabled`, train LoRA adapters only (module doc).
        router_replay: `"none"` or `"rollout"` (R3, module doc; needs an HF MoE model).

    Raises:
        ValueError: bad sizes/dtypes, an unknown `router_replay`, or replay with a dense model.
    """

    #: MoE router hooks on the compute copy (None: dense model, or a subclass without HF routers)
    routing: RouterHooks | None = None
    router_replay: str = "none"

    def __init__(self, model_cfg: Mapping[str, Any], policy: PrecisionPolicy, *, lr: float,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, micro_batch_size: int = 8,
                 seed: int = 0, device: torch.device | str = "cpu",
                 initial_state_dict: Mapping[str, torch.Tensor] | None = None,
                 lora: Mapping[str, Any] | None = None, router_replay: str = "none"):
        if router_replay not in ("none", "rollout"):
            raise ValueError(f"bad value for 'policy.router_replay': {router_replay!r}; allowed: none, rollout")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if policy.master_dtype != torch.float32:
            raise ValueError(f"master weights must be float32, policy has {dtype_name(policy.master_dtype)}")
        self.precision = policy
        self.device = torch.device(device)
        self.max_grad_norm = float(max_grad_norm)
        self.micro_batch_size = int(micro_batch_size)
        #: test/debug hook applied to the fp32 master grads before the inf check (e.g. plant an inf).
        self.grad_hook: GradHook | None = None

        self.master = build_model(model_cfg, torch.float32, seed=seed, device=self.device)
        if initial_state_dict is not None:
            load_weights_(self.master, initial_state_dict)
        self._lora = bool(lora and lora.get("enabled"))
        if self._lora:
            self.master = _lora_wrap(self.master, lora)
        self._fsdp = _fsdp_wrap(self.master, policy)
        if self._fsdp or policy.param_dtype == torch.float32:
            self.compute = self.master
        else:
            self.compute = cast_params_(copy.deepcopy(self.master), policy.param_dtype)
        self._compute_stale = True
        routing = RouterHooks(self.compute)
        self.routing = routing if routing.routers else None
        if router_replay == "rollout" and self.routing is None:
            raise ValueError("policy.router_replay=rollout needs an MoE model (HF qwen2_moe, qwen3_moe or mixtral "
                             "routers); this model is dense: set policy.router_replay=none")
        self.router_replay = router_replay
        self._last_experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._master_params = list(self.master.parameters())
        self._compute_params = list(self.compute.parameters())
        self._acc: list[torch.Tensor | None] = [None] * len(self._compute_params)  # grad accumulators
        trainable = [p for p in self._master_params if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        ls = policy.loss_scale
        self.scaler = DynamicLossScaler.from_config(ls) if ls.enabled else None

    # ------------------------------------------------------------------ helpers
    def _sync_compute(self) -> None:
        """Cast master -> compute copy, once per optimizer step (lazily)."""
        if self._compute_stale and self.compute is not self.master:
            with torch.no_grad():
                for pc, pm in zip(self._compute_params, self._master_params, strict=True):
                    pc.copy_(pm)
        self._compute_stale = False

    def _score(self, mb: RolloutBatch, temperature: float) -> torch.Tensor:
        """`[n, T]` fp32 log π of a micro-batch's response tokens through the compute copy
        (routed to `mb.rollout_experts` under `router_replay="rollout"`)."""
        routing = self.routing
        if routing is not None and self.router_replay == "rollout":
            if mb.rollout_experts is None:
                raise ValueError("policy.router_replay=rollout: the batch carries no rollout_experts (the rollout "
                                 "engine did not record its experts); use rollout.backend=torch or router_replay=none")
            routing.replay = replay_targets(mb.rollout_experts.to(self.device), mb.prompt_width, mb.input_ids.shape[1])
        try:
            return response_logprobs(self.compute, mb.input_ids.to(self.device), mb.attention_mask.to(self.device),
                                     mb.prompt_width, temperature, self.precision.logits_dtype)
        finally:
            if routing is not None:
                routing.replay = None

    def _gemm_ctx(self):
        return cpu_numerics(self.device, self.precision.param_dtype)

    def _dp(self) -> tuple[int, int]:
        """(rank, world size) of the data-parallel row split; (0, 1) without FSDP."""
        if not self._fsdp:
            return 0, 1
        return torch.distributed.get_rank(), torch.distributed.get_world_size()

    def _dp_group(self):
        """The process group of the data-parallel ranks (None = the default group)."""
        return None

    def _micro_batches(self, n: int, local: bool = False):
        """Row slices of `micro_batch_size`; `local=True`: only this data-parallel rank's rows."""
        lo, hi = 0, n
        rank, world = self._dp() if local else (0, 1)
        if world > 1:
            if n % world:
                raise ValueError(f"a batch of {n} rows does not split evenly over {world} data-parallel ranks; make "
                                 f"data.prompts_per_step x rollout.num_generations a multiple of {world}")
            lo, hi = rank * n // world, (rank + 1) * n // world
        for start in range(lo, hi, self.micro_batch_size):
            yield slice(start, min(hi, start + self.micro_batch_size))

    def _gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every data-parallel rank's rows (rank order), or return `local` alone."""
        _, world = self._dp()
        if world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(parts, local.contiguous(), group=self._dp_group())
        return torch.cat(parts)

    # ------------------------------------------------------------------ PolicyEngine
    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """`[N, T]` fp32 log π of the batch's response tokens (0 where masked), no grad.

        Returned on the batch's device, like the log-probs `train_step` hands to `loss_fn`.
        MoE: also records the experts the routers picked (`selected_experts`).
        """
        self._sync_compute()
        out, own, used = [], [], []
        routing = self.routing
        with torch.no_grad(), self._gemm_ctx():
            for rows in self._micro_batches(batch.num_samples, local=True):
                mb = batch.select(rows)
                if routing is not None:
                    routing.recording = True
                try:
                    logp = self._score(mb, temperature)
                finally:
                    if routing is not None:
                        routing.recording = False
                out.append(torch.where(mb.response_mask.to(self.device).bool(), logp, 0.0))
                if routing is not None:
                    n, s = mb.input_ids.shape
                    for dst, which in ((own, "own"), (used, "used")):
                        dst.append(response_experts(routing.collect(which, n, s), mb.prompt_width, mb.response_mask))
        if routing is not None:  # int32 through the gather (gloo), int16 at rest
            own_all, used_all = (self._gather_rows(torch.cat(x).int()).short().cpu() for x in (own, used))
            self._last_experts = (batch.input_ids.detach().cpu(), own_all, used_all)
        return self._gather_rows(torch.cat(out)).to(batch.input_ids.device)

    def selected_experts(self, batch: RolloutBatch, replayed: bool = False) -> torch.Tensor:
        """`[N, T, moe layers, k]` int16 expert ids of the trainer's routers for `batch` (-1 on padding).

        Entry t is the routing at the position that scores response token t (`moe_routing`).
        `replayed=False`: the routers' own top-k (before any replay: the flip-rate side);
        `replayed=True`: the experts the forward used (= `batch.rollout_experts` under R3).
        Taken from the last `logprobs` call when it scored the same tokens, else one no-grad pass.

        Raises:
            ValueError: a dense model.
        """
        if self.routing is None:
            raise ValueError("selected_experts needs an MoE model")
        cached = self._last_experts
        if cached is None or not torch.equal(cached[0], batch.input_ids.detach().cpu()):
            self.logprobs(batch, 1.0)
            cached = self._last_experts
        return cached[2] if replayed else cached[1]

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
        """One optimizer step over `batch` (micro-batched; see module doc for the skip rules)."""
        self._sync_compute()
        self.compute.zero_grad(set_to_none=True)
        self.master.zero_grad(set_to_none=True)
        self._acc = [None] * len(self._compute_params)
        scale = self.scaler.scale if self.scaler is not None else 1.0

        def backward(loss: torch.Tensor) -> None:
            (loss * scale).backward()
            self._accumulate_grads()

        loss_sum, metric_sums, micro = self._forward_backward(batch, loss_fn, temperature, backward)

        # FSDP averages over the data-parallel ranks (in fp32); the rows are pre-weighted by their share of
        # the global batch, so the step needs the sum: unscale by scale / world (exact for powers of two)
        grads = self._unscale_into_master(scale / self._dp()[1])
        if self.grad_hook is not None:
            self.grad_hook(grads)
        found_inf = _any_nonfinite(grads)
        if found_inf:
            grad_norm = float("nan")
        elif self.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._master_params, self.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not found_inf:
            self.optimizer.step()
            self._compute_stale = True
        self.master.zero_grad(set_to_none=True)
        self.compute.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update(found_inf)

        metrics = {"loss": loss_sum, **metric_sums, "loss_scale": scale, "skipped": float(found_inf)}
        return TrainStepResult(skipped=found_inf, grad_norm=grad_norm, loss_scale=scale, metrics=metrics,
                               micro_metrics=micro)

    def back_off_loss_scale(self, used_scale: float) -> bool:
        """Scale strictly below `used_scale` for a retry on the same batch (`DynamicLossScaler.back_off_below`);
        False without a scaler or at `min_scale`."""
        return self.scaler is not None and self.scaler.back_off_below(used_scale)

    def _forward_backward(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float,
                          backward: Callable[[torch.Tensor], None]):
        """This rank's micro-batches: score, loss, `backward(loss)`; returns the step's (loss, row-weighted
        metrics, per-micro-batch metrics), summed/gathered over data-parallel ranks."""
        loss_sum, metric_sums, micro, n_rows = 0.0, {}, [], batch.num_samples
        with self._gemm_ctx():
            for rows in self._micro_batches(n_rows, local=True):
                mb = batch.select(rows)
                logp = self._score(mb, temperature)
                loss, metrics = loss_fn(logp.to(mb.input_ids.device), rows)
                backward(loss)
                loss_sum += float(loss.detach())
                micro.append({k: float(v) for k, v in metrics.items()})
                w = (rows.stop - rows.start) / n_rows
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + w * float(v)
        return self._reduce_step_metrics(loss_sum, metric_sums, micro)

    def _reduce_step_metrics(self, loss_sum: float, metric_sums: dict[str, float], micro: list[dict[str, float]]):
        """Data parallel: sum the ranks' loss and row-weighted metrics, gather the micro-batch dicts."""
        _, world = self._dp()
        if world == 1:
            return loss_sum, metric_sums, micro
        dist = torch.distributed
        keys = sorted(metric_sums)
        t = torch.tensor([loss_sum, *(metric_sums[k] for k in keys)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self._dp_group())
        every: list[list[dict[str, float]] | None] = [None] * world
        dist.all_gather_object(every, micro, group=self._dp_group())
        vals = t.tolist()
        return vals[0], dict(zip(keys, vals[1:], strict=True)), [m for part in every for m in part]

    def _accumulate_grads(self) -> None:
        """Move the compute copy's micro-batch grads into accumulators in `grad_reduce_dtype`."""
        if self.compute is self.master:
            return  # fp32, or FSDP (which reduces in reduce_dtype itself): .grad accumulates
        for i, pc in enumerate(self._compute_params):
            if pc.grad is not None:
                g = pc.grad.to(self.precision.grad_reduce_dtype, copy=True)
                self._acc[i] = g if self._acc[i] is None else self._acc[i].add_(g)
                pc.grad = None

    def _unscale_into_master(self, scale: float) -> list[torch.Tensor]:
        """fp32 master grads = accumulated grads (upcast) / scale, divided in fp32."""
        grads = []
        for i, pm in enumerate(self._master_params):
            if self.compute is not self.master:
                acc, self._acc[i] = self._acc[i], None
                pm.grad = None if acc is None else acc.to(pm.dtype)
            if pm.grad is None:
                continue
            if scale != 1.0:
                pm.grad.div_(scale)
            grads.append(pm.grad)
        return grads

    def activation_headroom(self, batch: RolloutBatch) -> dict[str, float]:
        """fp16 range monitor: max |hidden state| per decoder layer over a no-grad forward of `batch`.

        Returns `range/act_absmax[/layer{i}]`, `range/fp16_headroom` (65504 / max) and
        `range/act_nonfinite`; every position counts, padding included (it runs in fp16 too).
        """
        self._sync_compute()
        with torch.no_grad(), self._gemm_ctx(), ActivationMonitor(self.compute) as monitor:
            for rows in self._micro_batches(batch.num_samples):
                mb = batch.select(rows)
                attn = mb.attention_mask.to(self.device)
                self.compute(input_ids=mb.input_ids.to(self.device), attention_mask=attn,
                             position_ids=position_ids_from_mask(attn), use_cache=False, logits_to_keep=1)
        return monitor.metrics()

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights under HF names, for the rollout engine's refit (LoRA: merged)."""
        if self._lora:
            return _merged_lora_state_dict(self.master)
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.master, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach() for k, v in self.master.state_dict().items()}

    def audit(self) -> list[str]:
        """Dtype findings: the compute copy against the policy, the master against fp32."""
        lines = [] if self._fsdp else audit_model(self.compute, self.precision)
        bad_master = sorted({dtype_name(p.dtype) for p in self._master_params if p.dtype != self.precision.master_dtype})
        if bad_master:
            lines.append(f"<master weights>: found {', '.join(bad_master)}, expected "
                         f"{dtype_name(self.precision.master_dtype)} (master_dtype)")
        bad_state = sorted({f"{k} {dtype_name(v.dtype)}" for st in self.optimizer.state.values() for k, v in st.items()
                            if torch.is_tensor(v) and v.is_floating_point() and k != "step"
                            and v.dtype != self.precision.master_dtype})
        if bad_state:
            lines.append(f"<optimizer state>: found {', '.join(bad_state)}, expected "
                         f"{dtype_name(self.precision.master_dtype)} (master_dtype)")
        return lines

    def state_dict(self) -> dict:
        """{"model", "optimizer", "scaler"}: live references, like torch's (clone before mutating).

        FSDP: full (unsharded, CPU) model and optimizer state on rank 0, empty dicts elsewhere.
        """
        model = {k: v.detach() for k, v in self.master.state_dict().items()} if self._lora else self.rollout_state_dict()
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim = get_optimizer_state_dict(self.master, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim = self.optimizer.state_dict()
        return {"model": model, "optimizer": optim,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore master weights, optimizer state and loss scale (validated before any copy)."""
        if (state.get("scaler") is None) != (self.scaler is None):
            raise ValueError("checkpoint and trainer disagree on loss scaling (precision.loss_scale.enabled)")
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.master, state["model"], options=opts)
            set_optimizer_state_dict(self.master, self.optimizer, state["optimizer"], options=opts)
        else:
            if self._lora:  # peft names (base_layer + lora_A/B), as `state_dict` saved them
                self.master.load_state_dict(state["model"], strict=True)
            else:
                load_weights_(self.master, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._compute_stale = True


def _any_nonfinite(grads: list[torch.Tensor]) -> bool:
    """True if any gradient holds inf/nan (one host sync, all-reduced under torch.distributed)."""
    if not grads:
        return False
    flags = torch.stack([(~torch.isfinite(_local(g))).any() for g in grads]).any().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags.item())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _fsdp_wrap(model: torch.nn.Module, policy: PrecisionPolicy) -> bool:
    """FSDP2 per decoder layer + root with the policy's param/reduce dtypes, when world > 1.

    Parameters stay fp32 (the master); FSDP casts them to `param_dtype` for compute and reduces
    gradients in `grad_reduce_dtype`, so the grads land in fp32 on the sharded master.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.grad_reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return True


def _lora_wrap(model: torch.nn.Module, lora: Mapping[str, Any]) -> torch.nn.Module:
    """peft LoRA around the fp32 master: base weights frozen, adapters (fp32) trainable."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("policy.lora with torch.distributed (FSDP) is not implemented; run LoRA single-process")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("policy.lora.enabled=true needs peft (pip install peft)") from e
    cfg = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]),
                     target_modules=list(lora["target_modules"]), lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)


def _merged_lora_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base model's HF-named state dict with every LoRA delta merged in (W + scale*B@A, fp32)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    with torch.no_grad():
        deltas = {f"{name}.weight": sum(m.get_delta_weight(a) for a in m.active_adapters)
                  for name, m in base.named_modules() if isinstance(m, LoraLayer)}
        out = {}
        for k, v in base.state_dict().items():
            if ".lora_" in k:
                continue
            k = k.replace(".base_layer.", ".")
            out[k] = (v + deltas[k]).detach() if k in deltas else v.detach()
    return out
