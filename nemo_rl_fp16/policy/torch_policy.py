"""`TorchPolicy`: the HF/torch policy π with fp32 master weights and fp16/bf16 compute.

Composition: the fp32 master step (master model + compute copy in `param_dtype`, AdamW, dynamic
loss scaling, overflow skip, unscale, clip) is `mixed_precision.MasterWeights`; the micro-batch
loop (data-parallel row split, micro-batches, gathers) is `micro_batches.MicroBatchLoop`, which
sees this backend's model only through `HFModelAdapter`. When `param_dtype` is fp32 the compute
copy *is* the master (no copy).

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

MoE models (HF Qwen2-MoE, Qwen3-MoE, Mixtral; `modeling.moe_routing` hooks their routers):
`logprobs` records the experts the trainer's own routers pick for each response token
(`selected_experts`, compared with the rollout's for `mismatch/router_topk_flip_rate`), and
`router_replay` = `rollout` (R3) / `trainer` (R2) routes the scoring forwards to recorded experts
with weights from the trainer's own gate; the shared logic is `expert_routing.ExpertRouting`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, TrainStepResult
from nemo_rl_fp16.modeling import (
    build_model,
    cast_params_,
    decoder_layers,
    load_weights_,
    response_logprobs,
)
from nemo_rl_fp16.modeling.moe_routing import RouterHooks, router_compute_audit, run_gates_in_weight_dtype
from nemo_rl_fp16.policy.expert_routing import ExpertRouting, check_router_replay
from nemo_rl_fp16.policy.micro_batches import DataParallel, MicroBatchLoop
from nemo_rl_fp16.policy.mixed_precision import GradHook, MasterWeights, check_master_dtype
from nemo_rl_fp16.precision import DynamicLossScaler, PrecisionMismatchError, PrecisionPolicy, audit_model, dtype_name
from nemo_rl_fp16.precision.cpu_numerics import cpu_numerics


class HFModelAdapter:
    """`micro_batches.ModelAdapter` over an HF causal LM (the torch backend's compute copy).

    Args:
        compute: the compute model (the FSDP-wrapped master under FSDP).
        precision: the policy-side precision (`param_dtype` picks the numerics, `logits_dtype` the log-softmax).
        device: where the model runs.
        experts: the MoE routing of `compute` (`expert_routing.ExpertRouting`; replay, recording).
        fsdp: the master is FSDP-sharded over the default process group (data parallel = world).
    """

    def __init__(self, compute: torch.nn.Module, precision: PrecisionPolicy, device: torch.device, *,
                 experts: ExpertRouting, fsdp: bool):
        self.compute = compute
        self.precision = precision
        self.device = device
        self.experts = experts
        self.fsdp = fsdp

    def score(self, mb: RolloutBatch, temperature: float) -> torch.Tensor:
        """`[n, T]` fp32 log π of the response tokens (`ModelAdapter.score`), routed as `experts` says.

        Args:
            mb (RolloutBatch): `n` rows of `[P + T]` tokens.
            temperature (float): the sampling temperature T° (log-probs of `logits / T°`).

        Returns:
            torch.Tensor: `[n, T]` fp32 log π, 0 where `response_mask` is 0.

        Raises:
            ValueError: replay is on and the batch carries no recorded experts (`ExpertRouting.replay_experts`).
        """
        with self.experts.replaying(mb):
            return response_logprobs(self.compute, mb.input_ids.to(self.device), mb.attention_mask.to(self.device),
                                     mb.prompt_width, temperature, self.precision.logits_dtype)

    def numerics(self) -> AbstractContextManager:
        """`precision.cpu_numerics` for `param_dtype` on this device (a no-op on GPUs and for fp32).

        Returns:
            AbstractContextManager: the numerics scope of every forward/backward.
        """
        return cpu_numerics(self.device, self.precision.param_dtype)

    def data_parallel(self) -> DataParallel:
        """(rank, world size, default group) under FSDP, else (0, 1, None).

        Returns:
            DataParallel: the FSDP rank and world size with the default group, or (0, 1, None).
        """
        if not self.fsdp:
            return DataParallel()
        return DataParallel(torch.distributed.get_rank(), torch.distributed.get_world_size(), None)


class TorchPolicy:
    """PolicyEngine over an HF causal LM (see module doc for the precision layout).

    Args:
        model_cfg: the recipe's `model:` block (see `modeling.build_model`).
        policy: the trainer-side precision policy.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the fp32 master grads to this total norm (`<= 0`: no clipping).
        micro_batch_size: rows per forward/backward; gradients accumulate across micro-batches.
        seed: seeds the random init of a `config`-built model (`modeling.build_model`).
        device: torch device of both copies.
        initial_state_dict: fp32 HF state dict to start from (e.g. after a warm start).
        lora: the recipe's `policy.lora` block; when `enabled`, train LoRA adapters only (module doc).
        router_replay: `"none"`, `"rollout"` (R3) or `"trainer"` (R2); `expert_routing`; needs an HF MoE model.
        activation_checkpointing: recompute each decoder layer in backward (HF gradient checkpointing,
            `use_reentrant=False`; `enable_layer_recompute`): the same values, less activation memory.
        sequence_packing: sorted, compactly laid-out micro-batches (`packing.py`; `policy.sequence_packing`).

    Attributes:
        weights: the fp32 master step (`MasterWeights`: master, compute copy, optimizer, scaler).
        loop: the micro-batch loop (`MicroBatchLoop`) over `adapter`.
        adapter: this backend's `HFModelAdapter`.
        grad_hook: test/debug hook applied to the fp32 master grads before the inf check.

    Raises:
        ValueError: bad sizes/dtypes, an unknown `router_replay`, or replay with a dense model.
    """

    def __init__(self, model_cfg: Mapping[str, Any], policy: PrecisionPolicy, *, lr: float,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, micro_batch_size: int = 8,
                 seed: int = 0, device: torch.device | str = "cpu",
                 initial_state_dict: Mapping[str, torch.Tensor] | None = None,
                 lora: Mapping[str, Any] | None = None, router_replay: str = "none",
                 activation_checkpointing: bool = False, sequence_packing: bool = False):
        check_router_replay(router_replay)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        check_master_dtype(policy)
        self.precision = policy
        self.device = torch.device(device)
        self.grad_hook: GradHook | None = None

        master = build_model(model_cfg, torch.float32, seed=seed, device=self.device)
        if initial_state_dict is not None:
            load_weights_(master, initial_state_dict)
        self._lora = bool(lora and lora.get("enabled"))
        if self._lora:
            master = _lora_wrap(master, lora)
        self._fsdp = _fsdp_wrap(master, policy)  # also read by preflight.py (FSDP masters are not checked)
        if self._fsdp or policy.param_dtype == torch.float32:
            compute = master
        else:
            compute = cast_params_(copy.deepcopy(master), policy.param_dtype, router_dtype=policy.router_dtype)
        if policy.router_dtype != policy.param_dtype:  # e.g. an fp32 router: gate logits, softmax, top-k in it
            run_gates_in_weight_dtype(compute)
        if activation_checkpointing:
            enable_layer_recompute(compute)
        routing = RouterHooks(compute)
        #: MoE routing of the compute copy: the trainer's experts, replay (`ExpertRouting`)
        self.experts = ExpertRouting(routing if routing.routers else None, router_replay, self.device)
        trainable = [p for p in master.parameters() if p.requires_grad]  # LoRA: the adapters only
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        self.weights = MasterWeights(master, compute, optimizer, policy, max_grad_norm=max_grad_norm)
        self.adapter = HFModelAdapter(compute, policy, self.device, experts=self.experts, fsdp=self._fsdp)
        self.loop = MicroBatchLoop(self.adapter, micro_batch_size, packing=sequence_packing)

    @property
    def master(self) -> torch.nn.Module:
        """The fp32 master model (FSDP-sharded under FSDP; peft-wrapped with LoRA)."""
        return self.weights.master

    @property
    def compute(self) -> torch.nn.Module:
        """The compute copy in `param_dtype` (the master itself for fp32 and FSDP)."""
        return self.weights.compute

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the master's trainable parameters (fp32 state)."""
        return self.weights.optimizer

    @property
    def scaler(self) -> DynamicLossScaler | None:
        """The dynamic loss scaler (None when `precision.loss_scale.enabled` is false)."""
        return self.weights.scaler

    @property
    def routing(self) -> RouterHooks | None:
        """The MoE router hooks on the compute copy (None: dense model)."""
        return self.experts.taps

    @property
    def router_replay(self) -> str:
        """`"none"`, `"rollout"` (R3) or `"trainer"` (R2) (settable; `expert_routing`)."""
        return self.experts.mode

    @router_replay.setter
    def router_replay(self, value: str) -> None:
        check_router_replay(value)
        self.experts.mode = value

    @property
    def max_grad_norm(self) -> float:
        """Clip norm of the fp32 master grads (`<= 0`: no clipping)."""
        return self.weights.max_grad_norm

    @property
    def micro_batch_size(self) -> int:
        """Rows per forward/backward (settable; the loop reads it at each call)."""
        return self.loop.micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int) -> None:
        self.loop.micro_batch_size = int(value)

    # scoring helpers read by doctor.py (the one-pass probe); the loop/weights/adapter hold the logic
    def _sync_compute(self) -> None:
        self.weights.sync_compute()

    def _gemm_ctx(self) -> AbstractContextManager:
        return self.adapter.numerics()

    def _micro_batches(self, n: int, local: bool = False) -> Iterator[slice]:
        return self.loop.slices(n, local)

    # ------------------------------------------------------------------ PolicyEngine
    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """Log π of the batch's response tokens, no grad (each data-parallel rank scores its rows).

        MoE: also records the experts the routers picked (`selected_experts`).

        Args:
            batch: the rollout batch (`N` rows, responses of width `T`).
            temperature: the sampling temperature the logits are divided by.

        Returns:
            `[N, T]` fp32, 0 where masked, on the batch's device (like the log-probs `train_step`
            hands to `loss_fn`).

        Raises:
            PrecisionMismatchError: MoE, the pass computed gate logits in another dtype than `router_dtype`.
        """
        self.weights.sync_compute()
        out = self.experts.logprobs(self.loop, batch, temperature)
        router = router_compute_audit(self.routing, self.precision.router_dtype)
        if router:  # MoE: the gate logits this pass computed are not in router_dtype
            raise PrecisionMismatchError("trainer", router)
        return out

    def selected_experts(self, batch: RolloutBatch, replayed: bool = False) -> torch.Tensor:
        """Expert ids of the trainer's routers for `batch`.

        Entry t is the routing at the position that scores response token t (`moe_routing`).
        Taken from the last `logprobs` call when it scored the same tokens, else one no-grad pass.

        Args:
            batch: the rollout batch (`N` rows, responses of width `T`).
            replayed: False: the routers' own top-k (before any replay: the flip-rate side);
                True: the experts the forward used (= `batch.rollout_experts` under R3).

        Returns:
            `[N, T, moe layers, k]` int16 expert ids on CPU, -1 on padding.

        Raises:
            ValueError: a dense model.
        """
        return self.experts.selected_experts(batch, replayed, lambda b: self.logprobs(b, 1.0))

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
        """One optimizer step over `batch` (micro-batched; skip rules: `mixed_precision` module doc).

        Args:
            batch: the rollout batch; each data-parallel rank trains its rows.
            loss_fn: the loop's loss closure (`interfaces.LossFn`).
            temperature: the sampling temperature the logits are divided by.

        Returns:
            The step's `TrainStepResult` (`skipped` on an fp16 overflow: weights untouched).

        Raises:
            ValueError: `router_replay="trainer"` (R2) without a `logprobs` pass over `batch` first.
        """
        batch = self.experts.prepare_update(batch)  # R2: replay the old-logprob pass's routing
        return self.weights.train_step(self.loop, batch, loss_fn, temperature, self.grad_hook)

    def back_off_loss_scale(self, used_scale: float) -> bool:
        """Scale strictly below `used_scale` for a retry on the same batch (`DynamicLossScaler.back_off_below`).

        Args:
            used_scale (float): the loss scale of the overflowing step.

        Returns:
            False without a scaler or at `min_scale`.
        """
        return self.weights.back_off_loss_scale(used_scale)

    def activation_headroom(self, batch: RolloutBatch) -> dict[str, float]:
        """fp16 range monitor over a no-grad forward of `batch` (`MicroBatchLoop.activation_headroom`).

        Args:
            batch (RolloutBatch): the rows of a no-grad forward.

        Returns:
            `range/act_absmax[/layer{i}]`, `range/fp16_headroom` (65504 / max), `range/act_nonfinite`.
        """
        self.weights.sync_compute()
        return self.loop.activation_headroom(self.compute, batch)

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights under HF names, for the rollout engine's refit (LoRA: merged).

        Returns:
            `{HF name: fp32 tensor}`; FSDP: the full (unsharded, CPU) dict, a collective on every rank.
        """
        if self._lora:
            return _merged_lora_state_dict(self.master)
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.master, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach() for k, v in self.master.state_dict().items()}

    def rollout_stream(self, dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """`rollout_state_dict()` one tensor at a time on rank `dst` only (`torch_refit_stream.stream_policy`).

        Args:
            dst: the global rank that sends to the rollout engines (FSDP: every rank iterates it).

        Returns:
            An iterator of `(HF name, fp32 tensor)` (empty on the other ranks).
        """
        from nemo_rl_fp16.policy.torch_refit_stream import stream_policy

        return stream_policy(self.master, lora=self._lora, fsdp=self._fsdp, dst=dst)

    def _fp32_named_params(self) -> Mapping[str, torch.Tensor]:
        """What the refit's non-finite check reads here (`torch_refit_stream.check_items`)."""
        from nemo_rl_fp16.policy.torch_refit_stream import check_items

        return check_items(self.master, lora=self._lora)

    def audit(self) -> list[str]:
        """Dtype findings: the compute copy against the policy, the master and optimizer state against fp32.

        Returns:
            One line per finding (empty: clean); FSDP: master and optimizer state only. MoE: also
            the dtype of the gate logits the forwards so far computed (`<router compute>`).
        """
        lines = [] if self._fsdp else audit_model(self.compute, self.precision)
        return lines + router_compute_audit(self.routing, self.precision.router_dtype) + self.weights.audit()

    def state_dict(self) -> dict:
        """{"model", "optimizer", "scaler"}: live references, like torch's (clone before mutating).

        `model` holds HF names (LoRA: peft names, base_layer + lora_A/B). FSDP: full (unsharded,
        CPU) model and optimizer state on rank 0, empty dicts elsewhere (a collective).

        Returns:
            dict: `model` (fp32 master, HF or peft names), `optimizer`, `scaler` (None without loss scaling).
        """
        model = {k: v.detach() for k, v in self.master.state_dict().items()} if self._lora else self.rollout_state_dict()
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim = get_optimizer_state_dict(self.master, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim = self.optimizer.state_dict()
        return {"model": model, "optimizer": optim, "scaler": self.weights.scaler_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore master weights, optimizer state and loss scale (validated before any copy).

        Args:
            state: a dict as `state_dict` returns it.

        Raises:
            ValueError: the checkpoint and this run disagree on loss scaling, or on parameter
                names/shapes (`modeling.load_weights_`).
        """
        self.weights.check_scaler_state(state)
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
        self.weights.load_scaler_state(state)


def _fsdp_wrap(model: torch.nn.Module, policy: PrecisionPolicy) -> bool:
    """FSDP2 per decoder layer + root with the policy's param/reduce dtypes, when world > 1.

    Parameters stay fp32 (the master); FSDP casts them to `param_dtype` for compute and reduces
    gradients in `grad_reduce_dtype`, so the grads land in fp32 on the sharded master.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if policy.router_dtype != policy.param_dtype:
        raise ValueError(f"precision.router_dtype={dtype_name(policy.router_dtype)} with the FSDP torch trainer "
                         f"(world size {dist.get_world_size()}) is not wired: FSDP's MixedPrecisionPolicy casts every "
                         "parameter to param_dtype; set precision.router_dtype=null, or policy.backend=megatron")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.grad_reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return True


def enable_layer_recompute(model: torch.nn.Module) -> int:
    """Turn on HF gradient checkpointing of every decoder layer, in eval mode (no dropout).

    The recompute runs under the forward's CPU numerics (`logprobs.same_function_modes`), so it is
    the same computation. HF recomputes a `GradientCheckpointingLayer` only when that layer's own `training` flag is set
    (and grad is on); the policy's models stay in eval mode, so the flag is set on those layers
    alone (their submodules keep eval behaviour: the forward is the same computation). No-grad
    scoring never recomputes.

    Args:
        model: an HF causal LM (or a peft wrapper of one).

    Returns:
        The number of decoder layers that recompute.

    Raises:
        ValueError: the model has no HF gradient-checkpointing layers.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    from nemo_rl_fp16.modeling.logprobs import same_function_modes

    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                          "context_fn": same_function_modes})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError(f"policy.activation_checkpointing=true: {type(model).__name__} has no HF gradient "
                         "checkpointing layers; set policy.activation_checkpointing=false")
    for m in layers:
        m.training = True  # the layer's own flag only (HF's condition); submodules stay in eval mode
    return len(layers)


def _lora_wrap(model: torch.nn.Module, lora: Mapping[str, Any]) -> torch.nn.Module:
    """LoRA (peft) around the fp32 master: base weights frozen, adapters (fp32) trainable."""
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
