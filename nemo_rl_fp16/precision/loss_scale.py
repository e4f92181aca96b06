"""Dynamic loss scaling for fp16 training: its settings and the scaler (megatron-core semantics)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling settings (megatron-core `DynamicGradScaler` semantics).

    Defaults, and why:
    - `initial_scale=2**16`: torch.amp's default. Megatron's 2**32 costs ~16 skipped steps at the
      start, and an RL step is expensive (its rollouts); log-prob losses have O(1) gradients, so
      2**16 leaves fp16 gradients well above the subnormal range from step one.
    - `growth_interval=200`: RL runs are hundreds, not hundreds of thousands, of steps; megatron's
      window of 1000 would never grow the scale back after an early backoff.
    - `hysteresis=2`: megatron's default; one isolated overflow skips the step but does not
      halve the scale, two in a row (without a growth in between) do.
    - `backoff_factor=0.5`, `growth_factor=2.0`, `min_scale=1.0`: megatron and torch.amp defaults.
    """

    enabled: bool = True
    initial_scale: float = 2.0**16
    min_scale: float = 1.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 200
    hysteresis: int = 2




class DynamicLossScaler:
    """Dynamic loss scale with megatron-core `DynamicGradScaler` semantics, on any device.

    On overflow: the growth tracker resets and the hysteresis tracker counts down; once it
    reaches zero the scale is multiplied by `backoff_factor` (floored at `min_scale`). After
    `growth_interval` consecutive clean steps the scale is multiplied by `growth_factor` and the
    hysteresis tracker is refilled. The scale is a Python float, so the scaler lives on CPU and
    GPU alike; `found_inf` may be a bool or a tensor. Source: megatron-core
    `optimizer/grad_scaler.py` (`DynamicGradScaler.update`); mixed-precision loss scaling as in
    Micikevicius et al. 2018 (arXiv 1710.03740).

    Args:
        initial_scale: the starting scale (default 2**16, see `LossScaleConfig`).
        min_scale: the backoff floor.
        growth_factor: multiplier after `growth_interval` clean steps (> 1).
        backoff_factor: multiplier once `hysteresis` overflows are counted (in (0, 1)).
        growth_interval: consecutive clean steps before a growth (>= 1).
        hysteresis: overflows, without a growth in between, before a backoff (>= 1).

    Raises:
        ValueError: a setting out of range (0 < min_scale <= initial_scale, growth_factor > 1,
            0 < backoff_factor < 1, growth_interval and hysteresis >= 1).
    """

    def __init__(
        self,
        initial_scale: float = LossScaleConfig.initial_scale,
        min_scale: float = LossScaleConfig.min_scale,
        growth_factor: float = LossScaleConfig.growth_factor,
        backoff_factor: float = LossScaleConfig.backoff_factor,
        growth_interval: int = LossScaleConfig.growth_interval,
        hysteresis: int = LossScaleConfig.hysteresis,
    ):  # the defaults are `LossScaleConfig`'s (one set, documented there)
        if not initial_scale > 0 or not min_scale > 0 or min_scale > initial_scale:
            raise ValueError(f"need 0 < min_scale <= initial_scale, got {min_scale=} {initial_scale=}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"growth_interval and hysteresis must be >= 1, got {growth_interval}, {hysteresis}")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._scale = float(initial_scale)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    @classmethod
    def from_config(cls, cfg: LossScaleConfig) -> DynamicLossScaler:
        """A scaler with `cfg`'s settings (`enabled` is the caller's business).

        Args:
            cfg: the resolved loss-scale settings (`PrecisionPolicy.loss_scale`).

        Returns:
            A fresh scaler at `cfg.initial_scale`.

        Raises:
            ValueError: settings out of range (as the constructor).
        """
        return cls(cfg.initial_scale, cfg.min_scale, cfg.growth_factor, cfg.backoff_factor,
                   cfg.growth_interval, cfg.hysteresis)

    @property
    def scale(self) -> float:
        """The current loss scale (a Python float; the loss is multiplied by it before backward)."""
        return self._scale

    def update(self, found_inf: bool | torch.Tensor) -> None:
        """Advance the scaler after one step attempt (see the class doc for the rules).

        Args:
            found_inf: whether any unscaled gradient was inf/nan (bool or a 0-dim tensor).
        """
        if bool(found_inf):
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def back_off_below(self, used_scale: float) -> bool:
        """Make the scale strictly lower than `used_scale`, before a retry on the same batch.

        `update(True)` has already run for the overflowed attempt; with hysteresis > 1 it may have
        kept the scale, and the same batch at the same scale overflows again. Here the scale backs
        off now (`used_scale * backoff_factor`, floored at `min_scale`) and the hysteresis counts as
        spent (tracker 0, as after a backoff in `update`). A scale already below `used_scale` stays.

        Args:
            used_scale: the scale the overflowed attempt ran with.

        Returns:
            bool: True when the scale is now below `used_scale`; False at `min_scale` (no retry can
            run at a lower scale).
        """
        if self._scale < used_scale:
            return True
        lower = max(float(used_scale) * self.backoff_factor, self.min_scale)
        if not lower < used_scale:
            return False
        self._scale = lower
        self._hysteresis_tracker = 0
        return True

    def state_dict(self) -> dict[str, float | int]:
        """The scaler's state, for checkpoints.

        Returns:
            {"scale": float, "growth_tracker": int, "hysteresis_tracker": int}.
        """
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()` output (the scale may be a float or a 0-dim tensor).

        The settings (factors, interval, hysteresis, floor) are the constructor's, not restored.

        Args:
            state: a mapping with "scale", "growth_tracker" and "hysteresis_tracker".

        Raises:
            KeyError: a key is missing.
        """
        self._scale = float(torch.as_tensor(state["scale"]).item())
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])
