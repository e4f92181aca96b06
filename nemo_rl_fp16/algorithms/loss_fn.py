"""The RL objective of one update as a loss-function object (NeMo-RL's `LossFunction` interface).

`PolicyLossFn` holds the algorithm's hyper-parameters (`algorithm.*`) and is called like
NeMo-RL's `ClippedPGLossFn`: π log-probs of some rows, those rows' data, and the *global*
normalisers of the whole optimizer batch (`global_valid_toks`, `global_valid_seqs`). It returns
the rows' exact share of the batch's loss (policy-gradient term + `kl_coef` · KL(π‖ref)) and
metrics that are shares of the denominator `metric_denominators` declares for each of them.

`PolicyLossFn.bind` fixes one update's batch (old log-probs, µ log-probs, advantages, mask,
reference log-probs) and returns a `BoundLoss`: the `interfaces.LossFn` the engines call per
micro-batch as `loss_fn(logp, rows)`. Every data-parallel rank holds the whole batch, so the
counts it closes over are the global ones: the micro-batch shares on all ranks sum to the
full-batch loss, gradient and metrics whatever `policy.micro_batch_size` and the DP split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nemo_rl_fp16.algorithms.losses import policy_loss

#: What a metric's share is divided by: "valid_toks" / "valid_seqs" (summed over micro-batches),
#: "max" / "min" (extremes over micro-batches; `losses.combine_metrics`).
VALID_TOKS, VALID_SEQS, MAX, MIN = "valid_toks", "valid_seqs", "max", "min"


@dataclass(frozen=True)
class LossInputs:
    """One update's per-row constants (all detached), rows aligned with the `RolloutBatch`.

    Attributes:
        old_logp (torch.Tensor): `[N, T]` fp32 log π_old (π before this rollout's updates).
        rollout_logp (torch.Tensor): `[N, T]` fp32 log µ (the rollout engine's).
        advantages (torch.Tensor): `[N]` fp32 group advantages.
        mask (torch.Tensor): `[N, T]` response mask (1 = real response token).
        ref_logp (torch.Tensor | None): `[N, T]` fp32 log π_ref; None without the KL term.
    """

    old_logp: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logp: torch.Tensor | None = None

    def rows(self, rows: slice | torch.Tensor) -> LossInputs:
        """The same inputs restricted to `rows` (views, no copy).

        Args:
            rows (slice | torch.Tensor): the rows of the batch to keep (a micro-batch or a data-parallel
                share): a slice (views) or int64 row indices (sequence packing: copies).

        Returns:
            LossInputs: each tensor sliced to `[rows, T]` (`ref_logp` stays None when absent).
        """
        return LossInputs(self.old_logp[rows], self.rollout_logp[rows], self.advantages[rows], self.mask[rows],
                          None if self.ref_logp is None else self.ref_logp[rows])

    def global_valid_toks(self) -> float:
        """N_tok: the batch's masked (valid) response tokens.

        Returns:
            float: the count of nonzero `mask` entries over all `[N, T]` positions.
        """
        return float(self.mask.sum())

    def global_valid_seqs(self) -> float:
        """N_seq: the batch's rows with at least one valid token.

        Returns:
            float: the number of rows whose `mask` has a nonzero entry.
        """
        return float((self.mask.sum(-1) > 0).sum())


@dataclass(frozen=True)
class PolicyLossFn:
    """GRPO / GSPO / PG-Seq-IS with TIS / MIS and an optional KL(π‖ref) term (`losses.policy_loss`).

    Attributes mirror the recipe's `algorithm.*` keys; `kl_coef` is 0 when the run has no reference.
    """

    algorithm: str
    correction: str = "none"
    clip_low: float = 0.2
    clip_high: float = 0.2
    is_cap: float = 2.0
    reduction: str = "token_mean"
    kl_coef: float = 0.0
    kl_kind: str = "k3"

    @classmethod
    def from_config(cls, section: Any, with_reference: bool) -> PolicyLossFn:
        """The loss of a recipe's `algorithm` section.

        Args:
            section (AlgorithmSection): the typed `algorithm:` block.
            with_reference (bool): a reference policy scores the batch; without one the KL term
                is off whatever `algorithm.kl_coef` says (`kl_coef` > 0 builds the reference).

        Returns:
            PolicyLossFn: the configured loss.
        """
        use_kl = with_reference and section.kl_coef > 0
        return cls(section.name, correction=section.correction, clip_low=section.clip_low,
                   clip_high=section.clip_high, is_cap=section.is_cap, reduction=section.reduction,
                   kl_coef=section.kl_coef if use_kl else 0.0, kl_kind=section.kl_kind)

    def metric_denominators(self) -> dict[str, str]:
        """Each metric this loss reports and what its share is divided by (`VALID_TOKS`, ...).

        Returns:
            dict[str, str]: metric name -> `valid_toks` | `valid_seqs` (shares: the whole batch's
            value is the sum of the micro-batches') or `max` | `min` (extremes over them).
        """
        seq = self.algorithm == "gspo"
        ratio_unit = VALID_SEQS if seq else VALID_TOKS
        if self.correction == "mis" or self.algorithm == "pg_seq_is":
            weight_unit = VALID_SEQS
        elif self.correction == "tis":
            weight_unit = VALID_TOKS
        else:
            weight_unit = ratio_unit
        out = {"clip_fraction": ratio_unit, "ratio_mean": ratio_unit, "ratio_max": MAX, "ratio_min": MIN,
               "is_weight_mean": weight_unit, "is_weight_max": MAX, "mis_masked_fraction": VALID_SEQS}
        if self.kl_coef > 0:
            out["kl_to_ref"] = VALID_TOKS
        return out

    def __call__(self, logp: torch.Tensor, data: LossInputs, global_valid_toks: float,
                 global_valid_seqs: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The rows' share of the batch loss and metrics.

        Args:
            logp (torch.Tensor): `[n, T]` log π_θ of the rows (fp32, carries the gradient).
            data (LossInputs): the same rows' constants.
            global_valid_toks (float): N_tok of the whole optimizer batch.
            global_valid_seqs (float): N_seq of the whole optimizer batch.

        Returns:
            tuple[torch.Tensor, dict[str, float]]: the 0-dim fp32 loss share and the metrics
            (`metric_denominators`).

        Raises:
            ValueError: as `losses.policy_loss` (bad shapes, pairings, counts).
        """
        use_kl = data.ref_logp is not None and self.kl_coef > 0
        return policy_loss(
            self.algorithm, logp, data.old_logp, data.rollout_logp, data.advantages, data.mask,
            correction=self.correction, clip_low=self.clip_low, clip_high=self.clip_high, is_cap=self.is_cap,
            reduction=self.reduction, ref_logp=data.ref_logp if use_kl else None,
            kl_coef=self.kl_coef if use_kl else 0.0, kl_kind=self.kl_kind,
            global_valid_toks=global_valid_toks, global_valid_seqs=global_valid_seqs,
        )

    def bind(self, data: LossInputs) -> BoundLoss:
        """The `interfaces.LossFn` of one update: this loss on `data` with its global counts.

        Args:
            data (LossInputs): the whole optimizer batch's constants (`[N, T]` tensors).

        Returns:
            BoundLoss: callable as `loss_fn(logp, rows)`; normalises by `data`'s N_tok / N_seq.
        """
        return BoundLoss(self, data, data.global_valid_toks(), data.global_valid_seqs())


@dataclass(frozen=True)
class BoundLoss:
    """A `PolicyLossFn` bound to one update's batch: the `LossFn` engines call per micro-batch.

    Attributes:
        loss (PolicyLossFn): the objective.
        data (LossInputs): the whole batch's constants.
        global_valid_toks (float): N_tok of the batch.
        global_valid_seqs (float): N_seq of the batch.
    """

    loss: PolicyLossFn
    data: LossInputs
    global_valid_toks: float
    global_valid_seqs: float

    def __call__(self, logp: torch.Tensor, rows: slice | torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss share and metrics of micro-batch `rows` (`interfaces.LossFn`).

        Args:
            logp (torch.Tensor): `[n, T]` fp32 log π_θ of `rows`, with grad.
            rows (slice | torch.Tensor): the micro-batch's rows of the batch (int64 indices under packing).

        Returns:
            tuple[torch.Tensor, dict[str, float]]: as `PolicyLossFn.__call__`.
        """
        return self.loss(logp, self.data.rows(rows), self.global_valid_toks, self.global_valid_seqs)
