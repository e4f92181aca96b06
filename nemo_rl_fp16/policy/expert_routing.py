"""MoE routing on the policy side, shared by both backends: the trainer's own experts and routing replay.

`ExpertRouting` holds one model's router taps (`modeling.moe_routing.RouterHooks` on the HF
families, `policy.megatron.routing.MegatronRouting` on megatron-core's `RouterReplay`; both speak
the `RouterTaps` protocol) and the replay mode `policy.router_replay`:

- `none`: every forward routes by the trainer's own gate;
- `rollout` (R3, arXiv 2510.11370): every scoring forward — the log-probs the loss uses and each
  training micro-batch — routes the response tokens to `batch.rollout_experts`;
- `trainer` (R2): the old-logprob pass (`logprobs`) routes by the trainer's own gate and records the
  experts it used; every training forward on that batch (`prepare_update`: each micro-batch, each
  overflow retry, each of `updates_per_rollout`) replays them.

Under replay the routing *weights* still come from the trainer's own gate probabilities of the
replayed experts, so the gate keeps its gradient. The recorded ids ride in the batch's rows
(`RolloutBatch.select` slices them), so micro-batching and the data-parallel split see the same
indices as one process. `logprobs` records, per response token and MoE layer, both the routers' own
top-k (before any replay: the `mismatch/router_topk_flip_rate` side, `selected_experts`) and the
experts the forward used. Alignment of the `[N, T, layers, k]` ids: `modeling.moe_routing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.modeling.moe_routing import (
    MOE_MODEL_TYPES,
    ROUTER_REPLAY_CHOICES,
    replay_targets,
    response_experts,
)
from nemo_rl_fp16.policy.micro_batches import MicroBatchLoop
from nemo_rl_fp16.policy.packing import PACKED, in_row_order

__all__ = ["ExpertRouting", "RouterTaps", "check_router_replay"]

#: `RolloutBatch.extras` key marking a batch whose `rollout_experts` are the trainer's own (R2)
REPLAY_SOURCE = "router_replay_source"


class RouterTaps(Protocol):
    """What `ExpertRouting` needs from a model's MoE routers (`RouterHooks`, `MegatronRouting`).

    Attributes:
        recording: when True, each forward keeps the routers' own top-k and the experts used.
        replay: None, or `[b * S, layers, k]` long expert ids in HF positions for the next
            forward(s) (`moe_routing.replay_targets`); -1 rows keep the router's own choice.
    """

    recording: bool
    replay: torch.Tensor | None

    def collect(self, which: str, batch: int, seq: int) -> torch.Tensor:
        """`[batch, seq, layers, k]` ids of the last recorded forward (`which`: "own" or "used").

        Args:
            which (str): `own` (the routers' own top-k, before any replay) or `used` (the experts the
                forward routed to).
            batch (int): rows of that forward.
            seq (int): its sequence length.

        Returns:
            torch.Tensor: `[batch, seq, layers, k]` integer expert ids.
        """
        ...


def check_router_replay(mode: str) -> None:
    """Refuse an unknown `policy.router_replay` value.

    Args:
        mode (str): the `policy.router_replay` value.

    Raises:
        ValueError: `mode` is not one of `ROUTER_REPLAY_CHOICES` (names the allowed values).
    """
    if mode not in ROUTER_REPLAY_CHOICES:
        raise ValueError(f"bad value for 'policy.router_replay': {mode!r}; allowed: {', '.join(ROUTER_REPLAY_CHOICES)}")


class ExpertRouting:
    """One policy model's MoE routing: record the trainer's experts, replay recorded ones (module doc).

    Args:
        taps: the model's router taps, or None for a dense model.
        mode: `policy.router_replay` (`none`, `rollout`, `trainer`).
        device: where the model runs (replay ids are moved there).

    Raises:
        ValueError: an unknown `mode`, or replay with a dense model.
    """

    def __init__(self, taps: RouterTaps | None, mode: str, device: torch.device):
        check_router_replay(mode)
        if mode != "none" and taps is None:
            raise ValueError(f"policy.router_replay={mode} needs an MoE model (HF {', '.join(MOE_MODEL_TYPES)} "
                             "routers); this model is dense: set policy.router_replay=none")
        self.taps = taps
        self.mode = mode
        self.device = torch.device(device)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (input_ids, own, used)

    @property
    def is_moe(self) -> bool:
        """The model has MoE routers."""
        return self.taps is not None

    def replay_experts(self, mb: RolloutBatch) -> torch.Tensor | None:
        """The experts to route `mb`'s response tokens to, or None (own routing).

        Args:
            mb: the rows about to be scored.

        Returns:
            `[n, T, layers, k]` ids: R3 the rollout's, always; R2 the old-logprob pass's, in the
            update passes only (`prepare_update` marks those batches); else None.

        Raises:
            ValueError: replay is on and the batch carries no recorded experts.
        """
        if self.taps is None or self.mode == "none":
            return None
        if self.mode == "trainer" and mb.extras.get(REPLAY_SOURCE) != "trainer":
            return None  # R2: the old-logprob pass routes by the trainer's own gate (and records it)
        if mb.rollout_experts is None:
            raise ValueError("policy.router_replay=rollout: the batch carries no rollout_experts (the rollout "
                             "engine did not record its experts); use rollout.backend=torch or router_replay=none")
        return mb.rollout_experts

    @contextlib.contextmanager
    def replaying(self, mb: RolloutBatch) -> Iterator[None]:
        """Scope of one scoring forward over `mb` (`[n, P + T]` rows): arms the replay it needs, if any.

        Args:
            mb (RolloutBatch): the rows about to be scored (`prompt_width` P, responses of width T).

        Yields:
            None: the taps' `replay` is set for the scope (cleared on exit, also on an error).

        Raises:
            ValueError: from `replay_experts`.
        """
        experts = self.replay_experts(mb)
        if experts is None:
            yield
            return
        self.taps.replay = replay_targets(experts.to(self.device), mb.prompt_width, mb.input_ids.shape[1])
        try:
            yield
        finally:
            self.taps.replay = None

    def logprobs(self, loop: MicroBatchLoop, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """`loop.logprobs` that also records each response token's experts (kept for `selected_experts`).

        Args:
            loop: the backend's micro-batch loop (its adapter scores through `replaying`).
            batch: the rollout batch (`N` rows, responses of width `T`).
            temperature: as `ModelAdapter.score`.

        Returns:
            `[N, T]` fp32 log π, 0 where masked (as `MicroBatchLoop.logprobs`).
        """
        taps = self.taps
        if taps is None:
            return loop.logprobs(batch, temperature)
        own: list[torch.Tensor] = []
        used: list[torch.Tensor] = []
        rows: list[torch.Tensor | None] = []  # packed micro-batches: their rows (sorted by length, not in order)

        @contextlib.contextmanager
        def recording(mb: RolloutBatch):
            taps.recording = True
            try:
                yield
            finally:
                taps.recording = False
            n, s = mb.input_ids.shape
            packed = mb.extras.get(PACKED)  # a compact forward (sequence packing): back to the row's columns
            for dst, which in ((own, "own"), (used, "used")):
                x = response_experts(taps.collect(which, n, s), mb.prompt_width, mb.response_mask)
                dst.append(x if packed is None else packed.restore(x, -1))
            rows.append(None if packed is None else packed.rows)

        out = loop.logprobs(batch, temperature, around=recording)
        # int32 through the gather (gloo), int16 at rest
        own_all, used_all = (loop.gather_rows(in_row_order(x, rows).int()).short().cpu() for x in (own, used))
        self._last = (batch.input_ids.detach().cpu(), own_all, used_all)
        return out

    def recorded(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(own, used) `[N, T, layers, k]` int16 ids of the last `logprobs` call if it scored `batch`'s tokens.

        Args:
            batch (RolloutBatch): the batch whose `input_ids` must equal the last scored ones.

        Returns:
            tuple[torch.Tensor, torch.Tensor] | None: (own, used) ids on the CPU, or None when the
                last pass scored other tokens (or none ran).
        """
        last = self._last
        if last is None or not torch.equal(last[0], batch.input_ids.detach().cpu()):
            return None
        return last[1], last[2]

    def selected_experts(self, batch: RolloutBatch, replayed: bool,
                         rescore: Callable[[RolloutBatch], object]) -> torch.Tensor:
        """Expert ids of the trainer's routers for `batch` (entry t: the position that scores token t).

        Taken from the last `logprobs` call when it scored the same tokens, else from `rescore(batch)`
        (the backend's `logprobs`, which records them).

        Args:
            batch: the rollout batch (`N` rows, responses of width `T`).
            replayed: False: the routers' own top-k (before any replay: the flip-rate side);
                True: the experts the forward used (= `batch.rollout_experts` under R3).
            rescore: runs one recording `logprobs` pass over `batch`.

        Returns:
            `[N, T, moe layers, k]` int16 expert ids on CPU, -1 on padding.

        Raises:
            ValueError: a dense model.
        """
        if self.taps is None:
            raise ValueError("selected_experts needs an MoE model")
        rec = self.recorded(batch)
        if rec is None:
            rescore(batch)
            rec = self.recorded(batch)
        return rec[1] if replayed else rec[0]

    def prepare_update(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch the update passes train on.

        R2: a copy carrying the experts the last `logprobs` pass used on it (gathered over the
        data-parallel ranks) in place of the rollout's, marked for replay (`batch` itself is not
        changed: the loop's flip rate still compares the rollout's experts). Other modes: `batch`.

        Args:
            batch (RolloutBatch): the rollout batch of this update.

        Returns:
            RolloutBatch: R2: the marked copy; otherwise `batch` itself.

        Raises:
            ValueError: R2 and the last `logprobs` call scored other tokens (no recorded routing).
        """
        if self.taps is None or self.mode != "trainer":
            return batch
        rec = self.recorded(batch)
        if rec is None:
            raise ValueError("policy.router_replay=trainer: no old-logprob pass recorded for this batch; call "
                             "logprobs(batch) before train_step(batch)")
        return dataclasses.replace(batch, rollout_experts=rec[1], extras={**batch.extras, REPLAY_SOURCE: "trainer"})
