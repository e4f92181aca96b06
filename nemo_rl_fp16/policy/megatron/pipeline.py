"""Pipeline parallelism (PP) for the megatron backend, with megatron-core's pipeline schedules.

Each pipeline stage holds `num_layers / PP` consecutive decoder layers (megatron's uniform split,
`decoder.layers.{local}` with the global offset `stage * num_layers / PP`); the first stage also
holds the embedding, the last the final norm and the output layer (with tied embeddings the last
stage holds a copy of the embedding as `output_layer.weight`, kept equal by summing both copies'
gradients over megatron's embedding group, as megatron does).

Scoring and training run megatron-core's schedule (`pipeline_parallel.get_forward_backward_func`:
1F1B without interleaving; virtual stages are not used) over this data-parallel rank's
micro-batches (`MicroBatchLoop.slices`). Hidden states travel between stages in `param_dtype`
(`pipeline_dtype`); `variable_seq_lengths` lets the last micro-batch be smaller. Every stage
rotates the rows the same way (`MegatronCausalLM.rotate`), the last stage un-rotates its logits and
computes the fp32 log-probs vocab-parallel (`model.logprobs_from_local_logits`), then the loss
through the loop's `LossFn` (the same global normalisers as PP=1). Log-probs, the loss and the
metrics are broadcast from the last stage to every rank of the pipeline group, so every rank
returns the full-batch result the loop expects.

Gradients: megatron's schedule runs each micro-batch's backward with the loss scaled by
`config.grad_scale_func`. On CPU (`PipelineMasterWeights`) each compute-copy gradient is moved
into an fp32 accumulator as soon as it is accumulated (a post-accumulate-grad hook: the same
per-micro-batch fp32 accumulation as PP=1), unscaled into the fp32 master, the tied embedding's
two copies summed, the total norm summed over the stages (the tied copy counted once), and the
overflow check and skip are global. On CUDA megatron's DDP and optimizer do the same
(`finalize_model_grads`: DP reduce, embedding all-reduce; the optimizer's norm over the
model-parallel group).

Not covered: MoE with PP (refused in validation and by the build), interleaved (virtual) stages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch, TrainStepResult
from nemo_rl_fp16.modeling import response_width
from nemo_rl_fp16.policy.megatron.model import MegatronCausalLM, logprobs_from_local_logits, unwrap
from nemo_rl_fp16.policy.megatron.sequence_parallel import padded_width
from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop, ScoreScope
from nemo_rl_fp16.policy.mixed_precision import GradHook, MasterWeights, any_nonfinite
from nemo_rl_fp16.precision.range_monitor import ActivationMonitor

__all__ = ["PipelineLoop", "PipelineMasterWeights", "cuda_pipeline_step", "gather_stages", "stage_layers",
           "stage_state_dict"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_TIED_COPY = "output_layer.weight"


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def stage_layers(num_layers: int, stage: int | None = None, size: int | None = None) -> range:
    """The global decoder-layer indices pipeline stage `stage` holds (megatron's uniform split).

    Args:
        num_layers: decoder layers of the model.
        stage: the pipeline stage (default: this rank's, from megatron's parallel state).
        size: the pipeline-parallel size (default: megatron's).

    Returns:
        `range(stage * L / PP, (stage + 1) * L / PP)`.

    Raises:
        ValueError: `num_layers` does not divide by the pipeline size.
    """
    ps = _ps()
    stage = ps.get_pipeline_model_parallel_rank() if stage is None else stage
    size = ps.get_pipeline_model_parallel_world_size() if size is None else size
    if num_layers % size:
        raise ValueError(f"layers ({num_layers}) not divisible by policy.pipeline_parallel_size={size}")
    per = num_layers // size
    return range(stage * per, (stage + 1) * per)


def stage_state_dict(sd: Mapping[str, torch.Tensor], num_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """This stage's entries of a (TP/EP-sharded) megatron state dict under global names, renamed to local.

    Args:
        sd: megatron names with global layer indices (the whole model or one piece of it).
        num_layers: decoder layers of the model.
        tied: tied embeddings: the last stage (when not also the first) gets the embedding as its
            `output_layer.weight`.

    Returns:
        The entries this stage's `GPTModel` holds, with local layer indices.
    """
    ps = _ps()
    layers = stage_layers(num_layers)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    out = {}
    for k, v in sd.items():
        m = _LAYER.match(k)
        if m is not None:
            i = int(m.group(1))
            if i in layers:
                out[f"decoder.layers.{i - layers.start}." + k[m.end():]] = v
        elif k.startswith("embedding."):
            if first:
                out[k] = v
            if tied and last and not first and k == "embedding.word_embeddings.weight":
                out[_TIED_COPY] = v
        elif last:  # final norm, output layer
            out[k] = v
    return out


def gather_stages(full_stage: Mapping[str, torch.Tensor], num_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """Every stage's full (TP/EP-gathered) megatron tensors, under global names, on every rank.

    A collective over the pipeline group (`all_gather_object`, CPU tensors). The last stage's copy
    of a tied embedding is dropped (the first stage's is the one HF keeps).

    Args:
        full_stage: this stage's tensors under local megatron names (CPU).
        num_layers: decoder layers of the model.
        tied: tied embeddings (drop the last stage's `output_layer.weight` copy).

    Returns:
        `{megatron name: tensor}` of the whole model with global layer indices.
    """
    ps = _ps()
    size = ps.get_pipeline_model_parallel_world_size()
    stage = ps.get_pipeline_model_parallel_rank()
    off = stage_layers(num_layers).start
    mine = {}
    for k, v in full_stage.items():
        m = _LAYER.match(k)
        if m is not None:
            k = f"decoder.layers.{int(m.group(1)) + off}." + k[m.end():]
        elif tied and k == _TIED_COPY and stage > 0:
            continue
        mine[k] = v
    if size == 1:
        return mine
    every: list[Any] = [None] * size
    torch.distributed.all_gather_object(every, mine, group=ps.get_pipeline_model_parallel_group())
    out: dict[str, torch.Tensor] = {}
    for part in every:
        out.update(part)
    return out


def _broadcast_from_last(obj: Any) -> Any:
    """`obj` of the last pipeline stage on every rank of this pipeline group."""
    ps = _ps()
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                            group=ps.get_pipeline_model_parallel_group())
    return box[0]


class PipelineLoop(MicroBatchLoop):
    """`MicroBatchLoop` whose forwards and backwards run through megatron-core's pipeline schedule.

    Args:
        adapter: the megatron model adapter (`adapter.MegatronModelAdapter`).
        micro_batch_size: rows per micro-batch (>= 1).

    Raises:
        ValueError: `micro_batch_size < 1`.
    """

    @property
    def model(self) -> MegatronCausalLM:
        """The compute model (this stage's `GPTModel` inside its wrappers)."""
        return self.adapter.compute

    def _schedule(self, batch: RolloutBatch, rows: list[slice], temperature: float, on_logp, forward_only: bool
                  ) -> list[Any]:
        """Run megatron's schedule over `rows`; `on_logp(rows, mb, logp) -> (loss, record)` on the last stage."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        wrapper, device = self.model, self.adapter.device
        dtype = self.adapter.precision.logits_dtype
        mbs = iter([(r, batch.select(r)) for r in rows])

        def forward_step(data_iterator: Iterator, model: torch.nn.Module):
            r, mb = next(data_iterator)
            ids = mb.input_ids.to(device)
            rot, pos, causal, shift = wrapper.rotate(ids, mb.attention_mask.to(device))
            out = model(input_ids=rot, position_ids=pos, attention_mask=causal)

            def loss_func(logits: torch.Tensor):
                local = wrapper.unrotate(logits, shift, response_width(ids, mb.prompt_width) + 1, ids.shape[1])
                logp = logprobs_from_local_logits(local, ids, mb.prompt_width, temperature, dtype)
                loss, record = on_logp(r, mb, logp)
                # 3-tuple + calculate_per_token_loss: megatron neither divides by tokens nor by micro-batches
                return loss, torch.tensor(0, dtype=torch.int), record

            return out, loss_func

        s = padded_width(batch.input_ids.shape[1], wrapper.pad_multiple)  # as `rotate` pads (sequence parallel)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=mbs, model=[wrapper.module], num_microbatches=len(rows),
            seq_length=s, micro_batch_size=self.micro_batch_size, forward_only=forward_only)

    def logprobs(self, batch: RolloutBatch, temperature: float, around: ScoreScope | None = None) -> torch.Tensor:
        """No-grad log π of the whole batch through the pipeline (module doc); every rank returns it all.

        Args:
            batch: the rollout batch (`N` rows).
            temperature: as `ModelAdapter.score`.
            around: must be None (expert recording is not wired through the pipeline).

        Returns:
            `[N, T]` fp32, 0 where `response_mask` is 0, on `batch.input_ids`' device.

        Raises:
            NotImplementedError: `around` is given.
        """
        if around is not None:
            raise NotImplementedError("per-micro-batch scopes are not wired through the pipeline schedule")
        device = self.adapter.device

        def on_logp(r, mb, logp):
            return logp.new_zeros(()), {"logp": torch.where(mb.response_mask.to(device).bool(), logp, 0.0)}

        rows = list(self.slices(batch.num_samples, local=True))
        with torch.no_grad(), self.adapter.numerics():
            store = self._schedule(batch, rows, temperature, on_logp, forward_only=True)
        n_local = sum(r.stop - r.start for r in rows)
        if _ps().is_pipeline_last_stage():
            local = torch.cat([d["logp"].float() for d in store])
        else:
            local = torch.zeros(n_local, batch.input_ids.shape[1] - batch.prompt_width, device=device)
        torch.distributed.broadcast(local, src=_ps().get_pipeline_model_parallel_last_rank(),
                                    group=_ps().get_pipeline_model_parallel_group())
        return self.gather_rows(local).to(batch.input_ids.device)

    def forward_backward(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float,
                         backward: Callable[[torch.Tensor], torch.Tensor]
                         ) -> tuple[float, dict[str, float], list[dict[str, float]]]:
        """This rank's micro-batches through the pipeline schedule (forward, `loss_fn`, scaled backward).

        Args:
            batch: the whole batch; this data-parallel rank takes its slice.
            loss_fn: the loop's loss closure, evaluated on the last stage.
            temperature: as `ModelAdapter.score`.
            backward: here the loss *scaling* (`loss -> loss * scale`): megatron's schedule runs the
                backward itself (`config.grad_scale_func`).

        Returns:
            As `MicroBatchLoop.forward_backward`, on every rank (broadcast from the last stage).
        """
        n_rows = batch.num_samples

        def on_logp(r, mb, logp):
            loss, metrics = loss_fn(logp.to(mb.input_ids.device), r)
            return loss, {"loss": float(loss.detach()), "rows": r, "metrics": {k: float(v) for k, v in metrics.items()}}

        cfg = unwrap(self.model.module).config
        old = cfg.grad_scale_func
        cfg.grad_scale_func = backward
        try:
            with self.adapter.numerics():
                store = self._schedule(batch, list(self.slices(n_rows, local=True)), temperature, on_logp,
                                       forward_only=False)
        finally:
            cfg.grad_scale_func = old
        result = None
        if _ps().is_pipeline_last_stage():
            loss_sum, metric_sums, micro = 0.0, {}, []
            for d in store:
                loss_sum += d["loss"]
                micro.append(d["metrics"])
                w = (d["rows"].stop - d["rows"].start) / n_rows
                for k, v in d["metrics"].items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + w * v
            result = (loss_sum, metric_sums, micro)
        loss_sum, metric_sums, micro = _broadcast_from_last(result)
        return self._reduce_step_metrics(loss_sum, metric_sums, micro)

    def activation_headroom(self, model: torch.nn.Module, batch: RolloutBatch,
                            shard_group: Any = None) -> dict[str, float]:
        """fp16 range monitor over every stage's decoder layers (global layer indices), on every rank.

        Args:
            model: the compute model (this stage's layers are hooked).
            batch: the whole batch; each data-parallel rank runs its share, the ranks all-reduce.
            shard_group: as `MicroBatchLoop.activation_headroom` (the TP group under sequence parallelism).

        Returns:
            As `MicroBatchLoop.activation_headroom`, over the whole model.
        """
        def on_logp(r, mb, logp):
            return logp.new_zeros(()), {}

        with torch.no_grad(), self.adapter.numerics(), ActivationMonitor(model) as monitor:
            self._schedule(batch, list(self.slices(batch.num_samples, local=True)), 1.0, on_logp, forward_only=True)
        _, world, group = self.adapter.data_parallel()
        if world > 1:  # this stage's layers over the data-parallel ranks' shares
            monitor.all_reduce(group, self.adapter.device)
        if shard_group is not None:
            monitor.all_reduce(shard_group, self.adapter.device)
        mine = [(m.item(), n.item()) if m is not None else None for m, n in zip(monitor.max_abs, monitor.nonfinite,
                                                                                  strict=True)]
        ps = _ps()
        every: list[Any] = [None] * ps.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(every, mine, group=ps.get_pipeline_model_parallel_group())
        stages = [x for part in every for x in part]
        return _StagesMonitor(stages).metrics()


class _StagesMonitor(ActivationMonitor):
    """An `ActivationMonitor`'s maxima gathered from every pipeline stage, in global layer order."""

    def __init__(self, stages: list[tuple[float, float] | None]):
        self.layers = []
        self.max_abs = [None if x is None else torch.tensor(x[0]) for x in stages]
        self.nonfinite = [None if x is None else torch.tensor(x[1]) for x in stages]
        self._handles = []


def _shared_copy(name: str) -> bool:
    """The last stage's copy of a tied embedding (counted once in the norm, summed with the first's grad)."""
    ps = _ps()
    return name == _TIED_COPY and not ps.is_pipeline_first_stage()


class PipelineMasterWeights(MasterWeights):
    """`MasterWeights` for one pipeline stage on CPU (module doc: gradients under PP).

    Args:
        master: this stage's fp32 master model.
        compute: its compute copy (or `master` for fp32).
        optimizer: steps this stage's master parameters.
        precision: the policy-side precision.
        max_grad_norm: clip to this total norm over all stages (`<= 0`: no clipping).
        tied: the model ties its embeddings (the two stage copies' gradients are summed).

    Raises:
        ValueError: `precision.master_dtype` is not float32.
    """

    def __init__(self, master: torch.nn.Module, compute: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 precision, *, max_grad_norm: float, tied: bool):
        super().__init__(master, compute, optimizer, precision, max_grad_norm=max_grad_norm)
        self.tied = tied
        self._names = [k for k, _ in unwrap(master.module).named_parameters()]

    def train_step(self, loop: PipelineLoop, batch: RolloutBatch, loss_fn: LossFn, temperature: float,
                   grad_hook: GradHook | None = None) -> TrainStepResult:
        """One optimizer step of this stage over `batch` (skip, clip and scale rules as `MasterWeights`).

        Args:
            loop: the pipeline loop over the compute copy.
            batch: the whole batch.
            loss_fn: the loop's loss closure.
            temperature: as `ModelAdapter.score`.
            grad_hook: applied to the unscaled fp32 master grads before the inf check.

        Returns:
            `TrainStepResult`, identical on every rank; `grad_norm` is the norm over all stages.
        """
        self.sync_compute()
        self.compute.zero_grad(set_to_none=True)
        self.master.zero_grad(set_to_none=True)
        self._acc = [None] * len(self._compute_params)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        handles = []
        if self.compute is not self.master:
            for i, p in enumerate(self._compute_params):
                handles.append(p.register_post_accumulate_grad_hook(self._accumulate_one(i)))
        try:
            loss_sum, metric_sums, micro = loop.forward_backward(batch, loss_fn, temperature, lambda x: x * scale)
        finally:
            for h in handles:
                h.remove()
        grads = self._unscale_into_master(scale / loop.adapter.data_parallel().size)
        self._sum_tied_grads()
        if grad_hook is not None:
            grad_hook(grads)
        found_inf = any_nonfinite(grads)
        grad_norm = float("nan") if found_inf else self._clip()
        return self._finish_step(found_inf, grad_norm, scale, loss_sum, metric_sums, micro)

    def _accumulate_one(self, i: int):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.to(self.precision.grad_reduce_dtype, copy=True)
            self._acc[i] = g if self._acc[i] is None else self._acc[i].add_(g)
            p.grad = None
        return hook

    def _sum_tied_grads(self) -> None:
        """Sum the tied embedding's gradient over its first- and last-stage copies (megatron's embedding group)."""
        ps = _ps()
        if not self.tied or ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
            return
        name = "embedding.word_embeddings.weight" if ps.is_pipeline_first_stage() else _TIED_COPY
        p = self._master_params[self._names.index(name)]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.distributed.all_reduce(g, group=ps.get_embedding_group())
        p.grad = g

    def _clip(self) -> float:
        """Total fp32 grad norm over all stages (the tied copy once); clip to `max_grad_norm` if > 0."""
        ps = _ps()
        own = [p.grad for k, p in zip(self._names, self._master_params, strict=True)
               if p.grad is not None and not (self.tied and _shared_copy(k))]
        sq = torch.stack([g.float().pow(2).sum() for g in own]).sum() if own else torch.zeros(())
        torch.distributed.all_reduce(sq, group=ps.get_pipeline_model_parallel_group())
        norm = sq.sqrt()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in self._master_params if p.grad is not None],
                                                 self.max_grad_norm, norm)
        return float(norm)


def cuda_pipeline_step(policy: Any, batch: RolloutBatch, loss_fn: LossFn, temperature: float) -> TrainStepResult:
    """One optimizer step under PP on CUDA: megatron's schedule, DDP, `finalize_model_grads`, optimizer.

    Args:
        policy: the `MegatronPolicy` (CUDA path: `ddp`, `mcore_optimizer`, a `PipelineLoop`).
        batch: the whole batch.
        loss_fn: the loop's loss closure.
        temperature: as `ModelAdapter.score`.

    Returns:
        The step's `TrainStepResult` (`skipped` on an fp16 overflow), identical on every rank.
    """
    from megatron.core.distributed import finalize_model_grads

    opt, ddp = policy.mcore_optimizer, policy.ddp
    ddp.zero_grad_buffer()
    opt.zero_grad()
    scale = float(opt.get_loss_scale())
    policy.compute.train()
    cfg = unwrap(ddp).config
    cfg.no_sync_func = ddp.no_sync
    try:
        loss_sum, metric_sums, micro = policy.loop.forward_backward(batch, loss_fn, temperature, opt.scale_loss)
    finally:
        cfg.no_sync_func = None
    finalize_model_grads([ddp])  # DP reduce, tied-embedding all-reduce across stages, SP layernorms
    if policy.grad_hook is not None:
        policy.grad_hook([p.main_grad for p in ddp.parameters() if getattr(p, "main_grad", None) is not None])
    ok, grad_norm, _ = opt.step()
    policy.compute.eval()
    skipped = not ok
    grad_norm = float("nan") if skipped or grad_norm is None else float(grad_norm)
    metrics = {"loss": loss_sum, **metric_sums, "loss_scale": scale, "skipped": float(skipped)}
    return TrainStepResult(skipped=skipped, grad_norm=grad_norm, loss_scale=scale, metrics=metrics,
                           micro_metrics=micro)

