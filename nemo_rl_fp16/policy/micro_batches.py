"""The micro-batch loop both policy backends share by composition (`MicroBatchLoop`, `ModelAdapter`).

It holds the data-parallel row split, the micro-batches, the loss closure's global-normaliser
contract, and the gathers back to the full batch.

A backend (`TorchPolicy`, `MegatronPolicy`) holds one `MicroBatchLoop` and describes its model to
it through a `ModelAdapter`: how to score a micro-batch, the numerics scope its forwards run in,
and its data-parallel group. The loop never touches a backend's optimizer or weights.

Data parallel: every rank receives the whole batch, scores and trains its own equal, contiguous
slice of the rows (`slices(n, local=True)`), and returns full-batch results (`gather_rows`,
`forward_backward`'s reduced metrics). The loss closure (`interfaces.LossFn`) already returns each
micro-batch's exact share of the global loss (normalised by the global valid tokens / sequences),
so the micro-batches' and ranks' gradients are summed and never reweighted; only the reported
metrics are weighted, by row share. Layout of the rows: `interfaces.RolloutBatch`.

Sequence packing (`packing=True`, `policy.sequence_packing`, `packing.py`): each rank sorts its own
rows by real length and scores micro-batches of neighbours in a compact layout; the loss closure
then receives each micro-batch's original row indices (an int64 tensor instead of a slice) and the
log-probs are scattered back to the original row order before the gathers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from nemo_rl_fp16.interfaces import LossFn, RolloutBatch
from nemo_rl_fp16.modeling import position_ids_from_mask
from nemo_rl_fp16.policy.packing import compact, in_row_order, packed_slices, uncompact
from nemo_rl_fp16.policy.trim import trim, untrim
from nemo_rl_fp16.precision.range_monitor import ActivationMonitor

#: Called around each micro-batch's scoring forward in `MicroBatchLoop.logprobs`, with the micro-batch.
ScoreScope = Callable[[RolloutBatch], contextlib.AbstractContextManager]


class DataParallel(NamedTuple):
    """This process's place in the data-parallel row split.

    Attributes:
        rank: data-parallel rank, `0 <= rank < size`.
        size: number of data-parallel ranks (1: no split).
        group: the `torch.distributed` process group of those ranks (None: the default group).
    """

    rank: int = 0
    size: int = 1
    group: Any = None


@runtime_checkable
class ModelAdapter(Protocol):
    """What a policy backend tells the shared loop about its model (the only coupling between them).

    Attributes:
        device: the torch device the model runs on; micro-batches are moved there to be scored.
    """

    device: torch.device

    def score(self, mb: RolloutBatch, temperature: float) -> torch.Tensor:
        """Log π of a micro-batch's response tokens through the compute model.

        Args:
            mb: the rows to score (`RolloutBatch.select`), on any device.
            temperature: sampling temperature the logits are divided by (> 0; 0 means greedy = 1).

        Returns:
            `[n, T]` fp32 log-probs on `device`, with grad when grad is enabled; values at masked
            positions are undefined (callers mask them).
        """
        ...

    def numerics(self) -> contextlib.AbstractContextManager:
        """The numerics scope every forward/backward runs in (`precision.cpu_numerics`; a no-op on GPUs).

        Returns:
            contextlib.AbstractContextManager: entered around each forward/backward.
        """
        ...

    def data_parallel(self) -> DataParallel:
        """This process's data-parallel rank, size and group (read at each call).

        Returns:
            DataParallel: rank, size and process group (None for one process).
        """
        ...


class MicroBatchLoop:
    """Row split, micro-batching and the gathers, shared by every policy backend.

    Args:
        adapter: the backend's model adapter.
        micro_batch_size: rows per forward/backward (>= 1); gradients accumulate across micro-batches.
        trim: score each micro-batch at its own length (`trim.trim`: all-padding leading prompt and
            trailing response columns dropped). The megatron backend turns it on (bitwise on CPU,
            training included); the torch backend leaves it off: its fp16 log-probs stay bitwise
            but weight gradients reduce over fewer tokens in another order (~1e-6), `test_trim.py`.
        packing: sequence packing (`packing.py`, `policy.sequence_packing`): this rank's rows sorted
            by real length, micro-batches of neighbours, each in the compact layout (supersedes
            `trim`).

    Raises:
        ValueError: `micro_batch_size < 1`.
    """

    def __init__(self, adapter: ModelAdapter, micro_batch_size: int, trim: bool = False, packing: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.adapter = adapter
        self.micro_batch_size = int(micro_batch_size)
        self.trim = bool(trim)
        self.packing = bool(packing)

    def slices(self, n: int, local: bool = False) -> Iterator[slice]:
        """Row slices of at most `micro_batch_size` rows.

        Args:
            n: rows in the whole batch.
            local: only this data-parallel rank's contiguous `n / size` rows (else all `n`).

        Yields:
            `slice(start, stop)` into the batch's rows, in order.

        Raises:
            ValueError: `local` and `n` does not divide by the data-parallel size (names the fix).
        """
        lo, hi = 0, n
        rank, world, _ = self.adapter.data_parallel() if local else DataParallel()
        if world > 1:
            if n % world:
                raise ValueError(f"a batch of {n} rows does not split evenly over {world} data-parallel ranks; make "
                                 f"data.prompts_per_step x rollout.num_generations a multiple of {world}")
            lo, hi = rank * n // world, (rank + 1) * n // world
        for start in range(lo, hi, self.micro_batch_size):
            yield slice(start, min(hi, start + self.micro_batch_size))

    def local_micro_batches(self, batch: RolloutBatch) -> Iterator[slice | torch.Tensor]:
        """This rank's micro-batches of `batch`: contiguous slices, or sorted neighbours when packing.

        Args:
            batch: the whole batch (`N` rows).

        Yields:
            `slice` (unpacked) or `[n_mb]` int64 row indices (packed) into `batch`'s rows; the same
            count, `ceil(N / size / micro_batch_size)`, on every data-parallel rank.

        Raises:
            ValueError: as `slices`.
        """
        spans = list(self.slices(batch.num_samples, local=True))
        if not self.packing or not spans:
            yield from spans
            return
        yield from packed_slices(batch, slice(spans[0].start, spans[-1].stop), self.micro_batch_size)

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every data-parallel rank's rows in rank order (`local` alone without DP).

        Args:
            local: `[n_local, ...]` this rank's rows; every rank passes the same shape and dtype.

        Returns:
            `[n_local * size, ...]` on `local`'s device.
        """
        _, world, group = self.adapter.data_parallel()
        if world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    def logprobs(self, batch: RolloutBatch, temperature: float, around: ScoreScope | None = None) -> torch.Tensor:
        """No-grad log π of the whole batch, each rank scoring its rows, gathered.

        Args:
            batch: the rollout batch (`N` rows).
            temperature: as `ModelAdapter.score`.
            around: optional scope entered around each micro-batch's scoring forward (e.g. expert
                recording), with the batch that forward runs: packed, the compact one, whose
                `extras[packing.PACKED]` (`packing.Compact`) restores its response columns and rows.

        Returns:
            `[N, T]` fp32, 0 where `response_mask` is 0, on `batch.input_ids`' device.
        """
        out, order = [], []
        device = self.adapter.device
        with torch.no_grad(), self.adapter.numerics():
            for rows in self.local_micro_batches(batch):
                mb = batch.select(rows)
                if around is None:
                    logp = self._score(mb, temperature)
                elif self.packing:  # the scope sees the forward's compact batch (`extras[PACKED]`: how to undo it)
                    packed = compact(mb, rows)
                    with around(packed.batch):
                        logp = uncompact(self.adapter.score(packed.batch, temperature), packed)
                else:  # expert recording reads the micro-batch's full width: no trimming there
                    with around(mb):
                        logp = self.adapter.score(mb, temperature)
                out.append(torch.where(mb.response_mask.to(device).bool(), logp, 0.0))
                order.append(rows)
        return self.gather_rows(in_row_order(out, order)).to(batch.input_ids.device)

    def _score(self, mb: RolloutBatch, temperature: float) -> torch.Tensor:
        """`adapter.score` of the micro-batch packed (`packing.compact`) or trimmed (`trim.trim`), at the batch's width."""
        if self.packing:
            packed = compact(mb)
            return uncompact(self.adapter.score(packed.batch, temperature), packed)
        if not self.trim:
            return self.adapter.score(mb, temperature)
        return untrim(self.adapter.score(trim(mb), temperature), mb.response_mask.shape[1])

    def forward_backward(self, batch: RolloutBatch, loss_fn: LossFn, temperature: float,
                         backward: Callable[[torch.Tensor], None]) -> tuple[float, dict[str, float], list[dict[str, float]]]:
        """This rank's micro-batches: score, `loss_fn`, `backward(loss)`; results reduced over ranks.

        Args:
            batch: the whole batch (`N` rows); this rank takes its slice.
            loss_fn: the loop's loss closure (`interfaces.LossFn`): each micro-batch's exact share of
                the global loss, so nothing is reweighted here; called with the micro-batch's rows
                (a slice, or int64 row indices when packing).
            temperature: as `ModelAdapter.score`.
            backward: runs the backward of one micro-batch's loss (the backend scales the loss).

        Returns:
            (loss summed over micro-batches and ranks, each metric weighted by row share and summed
            over ranks, every micro-batch's metrics dict in rank order).
        """
        loss_sum, metric_sums, micro, n_rows = 0.0, {}, [], batch.num_samples
        with self.adapter.numerics():
            for rows in self.local_micro_batches(batch):
                mb = batch.select(rows)
                logp = self._score(mb, temperature)
                loss, metrics = loss_fn(logp.to(mb.input_ids.device), rows)
                backward(loss)
                loss_sum += float(loss.detach())
                micro.append({k: float(v) for k, v in metrics.items()})
                w = mb.num_samples / n_rows
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + w * float(v)
        return self._reduce_step_metrics(loss_sum, metric_sums, micro)

    def _reduce_step_metrics(self, loss_sum: float, metric_sums: dict[str, float], micro: list[dict[str, float]]):
        """Data parallel: sum the ranks' loss and row-weighted metrics, gather the micro-batch dicts."""
        _, world, group = self.adapter.data_parallel()
        if world == 1:
            return loss_sum, metric_sums, micro
        dist = torch.distributed
        keys = sorted(metric_sums)
        t = torch.tensor([loss_sum, *(metric_sums[k] for k in keys)], dtype=torch.float64, device=self.adapter.device)
        dist.all_reduce(t, group=group)
        every: list[list[dict[str, float]] | None] = [None] * world
        dist.all_gather_object(every, micro, group=group)
        vals = t.tolist()
        return vals[0], dict(zip(keys, vals[1:], strict=True)), [m for part in every for m in part]

    def activation_headroom(self, model: torch.nn.Module, batch: RolloutBatch,
                            shard_group: Any = None) -> dict[str, float]:
        """fp16 range monitor: max |hidden state| per decoder layer over a no-grad forward of `batch`.

        Each data-parallel rank runs its own rows, then the ranks all-reduce (MAX of each layer's
        absmax, SUM of the non-finite counts: `ActivationMonitor.all_reduce`): every rank returns
        the whole batch's figures.

        Args:
            model: the compute model, called HF-style (`input_ids`, `attention_mask`, `position_ids`,
                `use_cache`, `logits_to_keep`); its decoder layers are found by `ActivationMonitor`.
            batch: the whole batch; this rank runs its data-parallel share, in micro-batches.
            shard_group: a group whose ranks hold disjoint pieces of each hidden state (megatron's
                TP group under sequence parallelism), reduced the same way; None: none.

        Returns:
            `range/act_absmax[/layer{i}]`, `range/fp16_headroom` (65504 / max) and
            `range/act_nonfinite` of the whole batch, the same on every rank; every position counts,
            padding included (it runs in fp16 too).
        """
        device = self.adapter.device
        with torch.no_grad(), self.adapter.numerics(), ActivationMonitor(model) as monitor:
            for rows in self.slices(batch.num_samples, local=True):
                mb = batch.select(rows)
                attn = mb.attention_mask.to(device)
                model(input_ids=mb.input_ids.to(device), attention_mask=attn,
                      position_ids=position_ids_from_mask(attn), use_cache=False, logits_to_keep=1)
        _, world, group = self.adapter.data_parallel()
        if world > 1:
            monitor.all_reduce(group, device)
        if shard_group is not None:
            monitor.all_reduce(shard_group, device)
        return monitor.metrics()
