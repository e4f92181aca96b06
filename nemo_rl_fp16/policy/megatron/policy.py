"""`MegatronPolicy`: the policy π as a megatron-core `GPTModel` (TP / EP; MoE), behind `PolicyEngine`.

It composes the same parts as the torch backend: the shared micro-batch loop
(`micro_batches.MicroBatchLoop`, over `MegatronModelAdapter`) and, on CPU, the shared fp32
master step (`mixed_precision.MasterWeights`). The model is `model.MegatronCausalLM` around a
`GPTModel` (`model.py`), parallel state from `parallel.py`.

Weights always come from HF (a seeded `modeling.build_model` init or a local checkpoint, read
lazily: `convert.hf_source`) through `convert.hf_to_megatron_parts`, sharded per TP/EP rank
(`sharding.py`), so both backends start from the same fp32 values; `rollout_state_dict()` gathers
the shards back into HF names (fp32 master values).

Optimizer, two paths:
- CUDA: megatron's `Float16Module` + megatron `DistributedDataParallel` (fp32 grad buffers) +
  `get_megatron_optimizer(OptimizerConfig(fp16/bf16, loss_scale=None, initial_loss_scale,
  min_loss_scale, loss_scale_window, hysteresis, clip_grad))`: fp32 main params, megatron's
  `DynamicGradScaler`, optional distributed optimizer (`optimizer.py`). Resume is not implemented on this path
  (`load_state_dict` refuses: it needs megatron dist-checkpointing).
- CPU (megatron's optimizer and `DynamicGradScaler` allocate CUDA tensors): the shared
  `MasterWeights`, as the torch backend uses it: an fp32 master GPTModel with torch AdamW and
  `DynamicLossScaler`, a compute GPTModel in `param_dtype`, fp32 grad accumulation, overflow
  skip. With more than one process the grads go through megatron-core's `finalize_model_grads`
  (`grad_sync.CpuGradSync`: TP/EP/DP on gloo) and are clipped by the model-parallel norm; pipeline
  stages run `pipeline.PipelineMasterWeights` (PP alone on CPU: combined with TP/EP/DP, log-probs only). megatron-core on CPU also
  needs a few CUDA calls redirected: `cpu_rehearsal.enable_for_process` does that for the life of
  a CPU process (a CUDA model refuses to build where they are in place). The CPU path exists for
  CI and layout rehearsals (`scripts/rehearse.py`).

MoE routing (`routing.py`): MoE models are built with `moe_enable_routing_replay=True`, and
megatron-core's `RouterReplay` records each router's top-k (the trainer's `selected_experts`, for
`mismatch/router_topk_flip_rate`) and replays given experts for `policy.router_replay` (R3 / R2),
through the same backend-neutral logic as the torch backend (`policy.expert_routing.ExpertRouting`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, TrainStepResult
from nemo_rl_fp16.modeling.layout import ModelLayout
from nemo_rl_fp16.policy.expert_routing import ExpertRouting, check_router_replay
from nemo_rl_fp16.policy.megatron.adapter import MegatronModelAdapter
from nemo_rl_fp16.policy.megatron.convert import (
    hf_source,
    hf_to_megatron,
    hf_to_megatron_parts,
    megatron_to_hf,
    te_names,
)
from nemo_rl_fp16.policy.megatron.cpu_rehearsal import check_cuda_clean, enable_for_process, ep_spans_data_parallel
from nemo_rl_fp16.policy.megatron.grad_sync import CpuGradSync
from nemo_rl_fp16.policy.megatron.model import MegatronCausalLM, build_gpt_model, transformer_config, unwrap
from nemo_rl_fp16.policy.megatron.optimizer import back_off_grad_scalers, build_megatron_optimizer, megatron_train_step
from nemo_rl_fp16.policy.megatron.parallel import init_megatron_parallel
from nemo_rl_fp16.policy.megatron.pipeline import (
    PipelineLoop,
    PipelineMasterWeights,
    cuda_pipeline_step,
    gather_stages,
    stage_state_dict,
)
from nemo_rl_fp16.policy.megatron.refit_stream import local_spec_names, stream_hf_weights, stream_hf_weights_pp
from nemo_rl_fp16.policy.megatron.routing import MegatronRouting, install_partial_replays
from nemo_rl_fp16.policy.megatron.sequence_parallel import sequence_parallel_problem, spec_attention
from nemo_rl_fp16.policy.megatron.sharding import gather_full_state_dict, load_shard_, shard_state_dict
from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop
from nemo_rl_fp16.policy.mixed_precision import GradHook, MasterWeights, check_master_dtype
from nemo_rl_fp16.policy.packing import PACKING_WITH_PP
from nemo_rl_fp16.precision import DynamicLossScaler, PrecisionPolicy, audit_model, dtype_name, is_router_param

__all__ = ["MegatronModelAdapter", "MegatronPolicy"]


class MegatronPolicy:
    """PolicyEngine over a megatron-core GPTModel (see module doc for both optimizer paths).

    Args:
        model_cfg: the recipe's `model:` block (a `config` or a local safetensors folder).
        policy: the trainer-side precision policy.
        lr: learning rate (AdamW on CPU; megatron's Adam on CUDA).
        weight_decay: weight decay.
        max_grad_norm: clip the fp32 grads to this total norm (`<= 0`: no clipping on CPU).
        micro_batch_size: rows per forward/backward; gradients accumulate across micro-batches.
        seed: seeds a `config`-built model's init and megatron's model-parallel RNG.
        device: `cpu` or a CUDA device.
        initial_state_dict: fp32 HF state dict to start from (e.g. after a warm start).
        tensor_parallel_size: TP.
        pipeline_parallel_size: PP (dense models; megatron's pipeline schedule: `pipeline.py`).
        expert_parallel_size: EP (MoE).
        sequence_parallel: megatron sequence parallelism (TP > 1).
        activation_checkpointing: full activation recomputation.
        use_distributed_optimizer: megatron's distributed optimizer (CUDA; refused on CPU).
        attention: `auto` | `te` | `sdpa` | `local` (`attention.resolve_attention`).
        fused_elementwise: megatron's compiled SwiGLU / bias-dropout-add (`model.transformer_config`).
        router_replay: `"none"`, `"rollout"` (R3) or `"trainer"` (R2) (`expert_routing`); needs an MoE
            model and, with TP > 1, no sequence parallelism.
        sequence_packing: sorted micro-batches in the compact layout (`policy.packing`); PP = 1 only
            (the pipeline schedule runs every micro-batch at the batch's width). Without it the
            micro-batches are trimmed (`policy.trim`).
        forward_only: build only the scoring model in `param_dtype` (no fp32 master, optimizer or
            gradient buffers): the KL reference (`policy.reference.ReferencePolicy`); `train_step` refuses.

    Attributes:
        layout: the model's `ModelLayout`.
        tconfig: the compute model's megatron `TransformerConfig`.
        weights: the shared fp32 master step on CPU (None on CUDA: megatron's optimizer).
        loop: the shared micro-batch loop over `adapter`.
        experts: the compute model's MoE routing (`expert_routing.ExpertRouting`).
        mcore_optimizer: megatron's optimizer on CUDA (None on CPU).
        grad_hook: test/debug hook on the fp32 grads before the inf check.

    Raises:
        ValueError: bad sizes/dtypes, an unmapped HF feature, a parallel layout that does not divide,
            an unknown `router_replay`, replay with a dense model or sequence parallelism, PP with
            an MoE model (`ModelLayout.parallel_problems`), sequence parallelism the layer spec
            cannot run (`sequence_parallel.sequence_parallel_problem`), or
            `use_distributed_optimizer=True` on CPU, `sequence_packing` with PP > 1.
    """

    def __init__(self, model_cfg: Mapping[str, Any], policy: PrecisionPolicy, *, lr: float,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, micro_batch_size: int = 8,
                 seed: int = 0, device: torch.device | str = "cpu",
                 initial_state_dict: Mapping[str, torch.Tensor] | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, expert_parallel_size: int = 1,
                 sequence_parallel: bool = False, activation_checkpointing: bool = False,
                 use_distributed_optimizer: bool = False, attention: str = "auto", fused_elementwise: bool = False,
                 router_replay: str = "none", sequence_packing: bool = False, forward_only: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if sequence_packing and int(pipeline_parallel_size) > 1:  # the validation stage: plan.unimplemented_problems
            raise ValueError(PACKING_WITH_PP)
        check_master_dtype(policy)
        check_router_replay(router_replay)
        self.precision = policy
        self.device = torch.device(device)
        self.cpu = self.device.type == "cpu"
        self.max_grad_norm = float(max_grad_norm)
        self.grad_hook: GradHook | None = None
        tp, pp, ep = int(tensor_parallel_size), int(pipeline_parallel_size), int(expert_parallel_size)
        self.pp = pp
        hf_sd, hf_config, self._hf_fused_experts = hf_source(model_cfg, seed, initial_state_dict)
        self.layout = ModelLayout.from_hf_config(hf_config)
        problems = self.layout.parallel_problems(tp, pp, ep)
        if problems:
            raise ValueError("; ".join(problems))
        # TE's sliding window is not mapped (layer_spec): auto takes sdpa there
        self.attention = attention = spec_attention(attention, cuda=not self.cpu, sliding_window=self.layout.sliding_window)
        sp_problem = sequence_parallel_problem(sequence_parallel=sequence_parallel, tp=tp, attention=attention)
        if sp_problem:  # the validation stage applies the same rule (plan.megatron_layout_problems)
            raise ValueError(sp_problem)
        if use_distributed_optimizer and self.cpu:
            raise ValueError("bad value for 'policy.use_distributed_optimizer': true on CPU; allowed: false or null "
                             "(megatron's distributed optimizer keeps its buffers and grad scaler on CUDA; the CPU path "
                             "steps torch AdamW over fp32 master weights); set policy.use_distributed_optimizer=null")
        if router_replay != "none" and sequence_parallel and tp > 1:
            raise ValueError(f"policy.router_replay={router_replay} with policy.sequence_parallel=true is not wired "
                             "(the routers see a sequence shard); set policy.sequence_parallel=false")
        if self.cpu:  # megatron-core's hard-coded CUDA calls sent to the CPU for this process (a rehearsal)
            enable_for_process()
        else:
            check_cuda_clean()
        init_megatron_parallel(tp, pp, ep, seed=seed, cpu=self.cpu)
        shard: dict[str, torch.Tensor] = {}
        for part in hf_to_megatron_parts(hf_sd, self.layout):  # one layer's full tensors at a time
            shard.update(self._stage(shard_state_dict(part, self.layout)))
        del hf_sd
        use_te = attention == "te"
        if use_te:
            shard = te_names(shard)
        self.use_te = use_te

        def make(dtype: torch.dtype):
            cfg = transformer_config(self.layout, params_dtype=dtype, router_dtype=policy.router_dtype, tp=tp, pp=pp,
                                     ep=ep,
                                     sequence_parallel=sequence_parallel,
                                     activation_checkpointing=activation_checkpointing, cpu=self.cpu,
                                     fused_elementwise=fused_elementwise, routing_replay=self.layout.is_moe)
            gpt = build_gpt_model(self.layout, cfg, use_te=use_te, attention=attention).to(self.device)
            install_partial_replays(gpt)  # this model's own RouterReplay instances, none in megatron's registry
            for p in gpt.parameters():  # megatron builds norms in fp32 whatever params_dtype (Float16Module casts)
                p.data = p.data.to(dtype)
            self._router_to_fp32(gpt)
            load_shard_(gpt, shard)  # after the casts: each tensor rounded once, from fp32
            return gpt, cfg

        self.use_distributed_optimizer = bool(use_distributed_optimizer)
        self._world_is_one = not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)
        self.weights: MasterWeights | None = None
        self.mcore_optimizer = None
        self.forward_only = bool(forward_only)
        if forward_only:  # the same param_dtype values the full engine's compute copy holds, nothing else
            gpt, self.tconfig = make(policy.param_dtype)
            if not self.cpu and policy.param_dtype != torch.float32:
                from megatron.core.transformer.module import Float16Module

                gpt = Float16Module(self.tconfig, gpt)  # as _init_cuda: casts params, fp32 logits
                self._router_to_fp32(gpt)
                load_shard_(gpt, shard)
            self._model = MegatronCausalLM(gpt, self.layout).eval()
        elif self.cpu:
            # CPU: the shared fp32 master step (MasterWeights), as the torch backend uses it
            gpt32, self.tconfig = make(torch.float32)
            master = MegatronCausalLM(gpt32, self.layout).eval()
            if policy.param_dtype == torch.float32:
                compute = master
            else:
                gptc, self.tconfig = make(policy.param_dtype)
                compute = MegatronCausalLM(gptc, self.layout).eval()
            optimizer = torch.optim.AdamW(list(master.parameters()), lr=lr, weight_decay=weight_decay)
            if pp > 1:  # PipelineMasterWeights sums the tied embedding over the stages (PP alone on CPU)
                self.weights = PipelineMasterWeights(master, compute, optimizer, policy, max_grad_norm=max_grad_norm,
                                                     tied=self.layout.tie_word_embeddings)
            else:
                # more than one process: megatron's finalize_model_grads sums DP and the partial TP grads
                sync = None if self._world_is_one else CpuGradSync(unwrap(compute.module), self.tconfig)
                self.weights = MasterWeights(master, compute, optimizer, policy, max_grad_norm=max_grad_norm,
                                             grad_sync=sync)
            self._model = compute
        else:
            self._model = self._init_cuda(make, shard, lr, weight_decay, use_distributed_optimizer)
        if self.layout.is_moe:
            self._model.routing = MegatronRouting(self._model.module)
        self.experts = ExpertRouting(self._model.routing, router_replay, self.device)
        self.adapter = MegatronModelAdapter(self._model, policy, self.device, self.experts)
        # own-length micro-batches (trim.py) or packed ones (packing.py); the pipeline schedule runs the batch's
        # width, and so does the CPU path when its allgather MoE dispatcher spans DP ranks (equal token counts
        # across the EP group: `ep_spans_data_parallel`), where packing is refused
        trim = not (self.cpu and self.layout.is_moe and ep_spans_data_parallel())
        if sequence_packing and not trim:
            from nemo_rl_fp16.policy.packing import PACKING_WITH_CPU_EP

            raise ValueError(PACKING_WITH_CPU_EP)  # the validation stage refuses it first (`plan.device_problems`)
        self.loop = (PipelineLoop(self.adapter, micro_batch_size) if pp > 1
                     else MicroBatchLoop(self.adapter, micro_batch_size, trim=trim, packing=sequence_packing))

    def _stage(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This pipeline stage's part of a TP/EP-sharded state dict (everything at PP=1)."""
        return stage_state_dict(sd, self.layout.num_layers, self.layout.tie_word_embeddings) if self.pp > 1 else dict(sd)

    # -------------------------------------------------------------------------- CUDA path
    def _init_cuda(self, make, shard: Mapping[str, torch.Tensor], lr: float, weight_decay: float,
                   use_distributed_optimizer: bool) -> MegatronCausalLM:
        from megatron.core.transformer.module import Float16Module
        pol = self.precision
        # params_dtype/fp16/bf16 of the policy (Float16Module reads config.fp16/bf16); megatron's
        # optimizer then creates the fp32 main params from these (HF fp32 values rounded once).
        gpt, self.tconfig = make(pol.param_dtype)
        if pol.param_dtype != torch.float32:
            gpt = Float16Module(self.tconfig, gpt)  # casts params to fp16/bf16, logits back to fp32
            self._router_to_fp32(gpt)
            load_shard_(gpt, shard)  # fp32 router values exact (not fp16-rounded), others rounded once
        self.ddp, self.mcore_optimizer = build_megatron_optimizer(
            self.tconfig, gpt, pol, lr=lr, weight_decay=weight_decay, max_grad_norm=self.max_grad_norm,
            use_distributed_optimizer=use_distributed_optimizer)
        return MegatronCausalLM(self.ddp, self.layout).eval()

    def _router_to_fp32(self, model: torch.nn.Module) -> None:
        """Keep MoE router weights in fp32 when `router_dtype` is fp32 (as the rollout's fp32 gate)."""
        if self.precision.router_dtype != torch.float32:
            return
        for name, p in model.named_parameters():
            if is_router_param(name):
                p.data = p.data.float()

    # -------------------------------------------------------------------------- the models
    @property
    def master(self) -> MegatronCausalLM:
        """The fp32 master model on CPU; on CUDA the one DDP-wrapped model (fp32 main params live in the optimizer)."""
        return self.weights.master if self.weights is not None else self._model

    @property
    def compute(self) -> MegatronCausalLM:
        """The model in `param_dtype` that runs forward and backward (the master itself for fp32)."""
        return self._model

    @property
    def optimizer(self) -> Any:
        """The optimizer: torch AdamW over the fp32 master (CPU), or megatron's optimizer (CUDA)."""
        return self.weights.optimizer if self.weights is not None else self.mcore_optimizer

    @property
    def scaler(self) -> DynamicLossScaler | None:
        """The CPU path's dynamic loss scaler (None on CUDA, where megatron's `DynamicGradScaler` runs)."""
        return self.weights.scaler if self.weights is not None else None

    @property
    def micro_batch_size(self) -> int:
        """Rows per forward/backward."""
        return self.loop.micro_batch_size

    def _sync_compute(self) -> None:
        if self.weights is not None:
            self.weights.sync_compute()

    # -------------------------------------------------------------------------- PolicyEngine
    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """Log π of the batch's response tokens, no grad (each data-parallel rank scores its rows).

        MoE: also records the experts the routers picked (`selected_experts`).

        Args:
            batch: the rollout batch (`N` rows, responses of width `T`).
            temperature: the sampling temperature the logits are divided by.

        Returns:
            `[N, T]` fp32, 0 where masked, on the batch's device.
        """
        self._sync_compute()
        return self.experts.logprobs(self.loop, batch, temperature)

    def selected_experts(self, batch: RolloutBatch, replayed: bool = False) -> torch.Tensor:
        """Expert ids of the trainer's routers for `batch` (`ExpertRouting.selected_experts`).

        Entry t is the routing at the position that scores response token t (the position its
        log-prob comes from); taken from the last `logprobs` call when it scored the same tokens,
        else one no-grad pass. Compare with `batch.rollout_experts` through
        `mismatch.router_topk_flip_rate`.

        Args:
            batch: the rollout batch (`N` rows, responses of width `T`).
            replayed: False: the routers' own top-k (before any replay); True: the experts used.

        Returns:
            `[N, T, moe layers, k]` int16 expert ids on CPU (sorted per token), -1 on padding.

        Raises:
            ValueError: a dense model.
        """
        return self.experts.selected_experts(batch, replayed, lambda b: self.logprobs(b, 1.0))

    @property
    def routing(self) -> MegatronRouting | None:
        """The compute model's megatron router taps (None: dense model)."""
        return self.experts.taps

    @property
    def router_replay(self) -> str:
        """`"none"`, `"rollout"` (R3) or `"trainer"` (R2) (settable; `expert_routing`)."""
        return self.experts.mode

    @router_replay.setter
    def router_replay(self, value: str) -> None:
        check_router_replay(value)
        self.experts.mode = value

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
        """One optimizer step over `batch` (CPU: `MasterWeights`; CUDA: megatron's optimizer).

        Args:
            batch: the rollout batch; each data-parallel rank trains its rows.
            loss_fn: the loop's loss closure (`interfaces.LossFn`).
            temperature: the sampling temperature the logits are divided by.

        Returns:
            The step's `TrainStepResult` (`skipped` on an fp16 overflow: weights untouched).

        Raises:
            NotImplementedError: on CPU with pipeline stages and TP, EP or DP > 1 as well (the
                pipeline step syncs the tied embedding only; TP/EP/DP alone go through `CpuGradSync`).
            ValueError: `router_replay="trainer"` (R2) without a `logprobs` pass over `batch` first.
            RuntimeError: a `forward_only` policy.

        Gradients: megatron-core's `finalize_model_grads` sums them over DP and, where each TP rank
        holds only part of a replicated parameter's gradient (sequence-parallel norms and router,
        q/k norms), over TP; on CPU through `grad_sync.CpuGradSync` (more than one process).
        """
        if self.forward_only:
            raise RuntimeError("this MegatronPolicy is forward-only (the KL reference): it has no optimizer")
        batch = self.experts.prepare_update(batch)  # R2: replay the old-logprob pass's routing
        if self.weights is not None:
            if self.pp > 1 and self.pp != torch.distributed.get_world_size():
                raise NotImplementedError("CPU megatron train_step with pipeline parallelism runs pipeline stages "
                                          "only (no TP/EP/DP grads sync together with PP on CPU)")
            return self.weights.train_step(self.loop, batch, loss_fn, temperature, self.grad_hook)
        if self.pp > 1:
            return cuda_pipeline_step(self, batch, loss_fn, temperature)
        return megatron_train_step(self.ddp, self.mcore_optimizer, self.loop, self.compute, batch, loss_fn,
                                   temperature, self.device, self.grad_hook)

    def back_off_loss_scale(self, used_scale: float) -> bool:
        """Lower the loss scale strictly below `used_scale` for a retry on the same batch.

        CPU: `DynamicLossScaler.back_off_below`; CUDA: the same rule on megatron's `DynamicGradScaler`s.

        Args:
            used_scale (float): the loss scale of the overflowing step.

        Returns:
            False without a dynamic scaler (bf16/fp32, constant scale) or at `min_scale`.
        """
        if self.weights is not None:
            return self.weights.back_off_loss_scale(used_scale)
        return back_off_grad_scalers(self.mcore_optimizer, used_scale)

    def activation_headroom(self, batch: RolloutBatch) -> dict[str, float]:
        """fp16 range monitor over megatron's decoder layers (`MicroBatchLoop.activation_headroom`).

        Each data-parallel rank runs its share of the rows; the ranks all-reduce (over TP as well under
        sequence parallelism), so every rank returns the whole batch's figures.

        Args:
            batch (RolloutBatch): the rows of a no-grad forward.

        Returns:
            `range/act_absmax[/layer{i}]`, `range/fp16_headroom` (65504 / max), `range/act_nonfinite`.
        """
        self._sync_compute()
        from megatron.core import parallel_state as ps

        # sequence parallel: each TP rank's layer outputs are a sequence shard, reduced over TP too
        sp = self.tconfig.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        return self.loop.activation_headroom(self.compute, batch,
                                             shard_group=ps.get_tensor_model_parallel_group() if sp else None)

    # -------------------------------------------------------------------------- weights
    def _fp32_named_params(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under megatron names, fp32 master values."""
        if self.weights is not None:
            return {k: v for k, v in unwrap(self.master.module).named_parameters()}
        main = {}
        opts = getattr(self.mcore_optimizer, "chained_optimizers", [self.mcore_optimizer])
        for o in opts:
            for mg, fg in zip(getattr(o, "float16_groups", []), getattr(o, "fp32_from_float16_groups", []), strict=False):
                for mp, fp in zip(mg, fg, strict=True):
                    main[id(mp)] = fp
        return {k: main.get(id(p), p) for k, p in unwrap(self.ddp).named_parameters()}

    def tp_replicated_params(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """This rank's tensor-parallel group and its fp32 parameters that every rank of it holds whole.

        Norms, routers, q/k norms (not TP-sharded, not experts): `finalize_model_grads` sums their
        gradients over TP, so after any number of steps they must be bitwise equal across the group
        (the rehearsal checks this, `commands/rehearse.py`).

        Returns:
            tuple[list[int], dict[str, torch.Tensor]]: the TP group's global ranks, and megatron
                name -> fp32 CPU copy of each replicated parameter.
        """
        from megatron.core import parallel_state as ps

        ranks = torch.distributed.get_process_group_ranks(ps.get_tensor_model_parallel_group())
        return ranks, {k: v.detach().float().cpu().clone() for k, v in self._fp32_named_params().items()
                       if not getattr(v, "tensor_model_parallel", False) and getattr(v, "allreduce", True)}

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights under HF names (TP/EP shards and PP stages gathered), for the rollout refit.

        A collective over the TP/EP/PP groups. With the distributed optimizer on CUDA the fp32 shards
        are not gathered: the values are the model's fp16/bf16 parameters upcast (they equal the
        rounded master values).

        Returns:
            `{HF name: float32 CPU tensor}`, on every rank.
        """
        full = gather_full_state_dict(local_spec_names(self._fp32_named_params()), self.layout)
        if self.pp > 1:  # every stage's layers, global indices
            full = gather_stages(full, self.layout.num_layers, self.layout.tie_word_embeddings)
        return megatron_to_hf(full, self.layout, fused_experts=self._hf_fused_experts)

    def rollout_stream(self, dst: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """The rollout refit's weights streamed piece by piece to rank `dst` only (`refit_stream.py`).

        A collective: every rank iterates it to the end; only `dst` gets tensors.

        Args:
            dst: the global rank that sends to the rollout engines.

        Returns:
            An iterator of `(HF name, fp32 tensor)` (empty on the other ranks).
        """
        if self.pp > 1:  # each stage's sender sends its layers to `dst`, one at a time
            return stream_hf_weights_pp(local_spec_names(self._fp32_named_params()), self.layout,
                                        fused_experts=self._hf_fused_experts, dst=dst)
        return stream_hf_weights(local_spec_names(self._fp32_named_params()), self.layout,
                                 fused_experts=self._hf_fused_experts, dst=dst)

    def audit(self) -> list[str]:
        """Dtype findings on the megatron module.

        Checks params vs `param_dtype`, routers vs `router_dtype`, the effective router compute
        dtype (`moe_router_dtype`), and on CPU the fp32 master and optimizer state.

        Returns:
            One line per finding (empty: clean).
        """
        lines = audit_model(self.compute, self.precision)
        if self.weights is not None:
            lines += self.weights.audit()
        if self.layout.is_moe:
            eff = {"fp32": torch.float32, "fp64": torch.float64}.get(self.tconfig.moe_router_dtype or "",
                                                                     self.precision.param_dtype)
            if eff != self.precision.router_dtype:
                lines.append(f"<router compute>: megatron moe_router_dtype={self.tconfig.moe_router_dtype} computes gate "
                             f"logits in {dtype_name(eff)}, expected {dtype_name(self.precision.router_dtype)} (router_dtype)")
        return lines

    def state_dict(self) -> dict:
        """{"model", "optimizer", "scaler"}: live references (clone before mutating).

        `model` holds the fp32 master weights under HF names (`rollout_state_dict`, a collective);
        `optimizer` is the optimizer's own state dict (torch AdamW on CPU, megatron's on CUDA);
        `scaler` the CPU loss scaler's state (None on CUDA and without loss scaling).

        Returns:
            dict: the three entries above.
        """
        return {"model": self.rollout_state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": None if self.weights is None else self.weights.scaler_state()}

    def save_sharded(self, directory: str | Path, step: int | None = None) -> None:
        """Write model, optimizer (fp32 master / main params), loss scale and RNG as a distributed checkpoint.

        A collective over all ranks (`checkpointing.save_sharded`: megatron-core `dist_checkpointing`).

        Args:
            directory: an existing empty folder on a filesystem every rank sees.
            step: the RL step (for the non-finite message).

        Raises:
            NonFiniteError: a master weight is NaN/inf; nothing is written.
        """
        from nemo_rl_fp16.policy.megatron.checkpointing import save_sharded

        save_sharded(self, directory, step)

    def load_sharded(self, directory: str | Path) -> dict[str, Any]:
        """Restore a `save_sharded` checkpoint, also into another TP / EP / DP layout (`checkpointing.load_sharded`).

        Args:
            directory: the folder `save_sharded` wrote.

        Returns:
            {"saved": the writer's layout record, "rng_restored": bool}.

        Raises:
            ValueError: one line naming both layouts when megatron-core cannot reshard between them.
        """
        from nemo_rl_fp16.policy.megatron.checkpointing import load_sharded

        return load_sharded(self, directory)

    def load_state_dict(self, state: dict) -> None:
        """Restore master weights, optimizer state and loss scale (CPU; validated before any copy).

        Args:
            state: a dict as `state_dict` returns it.

        Raises:
            ValueError: the checkpoint and this run disagree on loss scaling, or on parameter names/shapes.
            NotImplementedError: on CUDA (the sharded fp32 main params, optimizer and grad scaler
                need megatron dist-checkpointing, not implemented yet).
        """
        if self.weights is None:
            raise NotImplementedError(
                "policy.backend=megatron on CUDA cannot resume yet: restoring its TP/EP-sharded fp32 main params, "
                "Adam state and DynamicGradScaler needs megatron dist-checkpointing (not implemented); "
                "start afresh with trainer.resume=never")
        self.weights.check_scaler_state(state)
        full = hf_to_megatron(state["model"], self.layout)
        load_shard_(self.master.module, self._stage(shard_state_dict(full, self.layout)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.weights.load_scaler_state(state)
