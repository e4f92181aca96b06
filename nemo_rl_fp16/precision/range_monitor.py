"""fp16 range monitor: the largest |activation| per decoder layer and the fp16 headroom."""

from __future__ import annotations

import math
from typing import Any

import torch

from nemo_rl_fp16.modeling.hf import decoder_layers
from nemo_rl_fp16.precision.policy import FP16_MAX


class ActivationMonitor:
    """fp16 headroom monitor: running max |hidden state| output of each decoder layer.

    Use as a context manager around forwards; `metrics()` reports the per-layer maxima, the
    overall max, the headroom factor `65504 / max` (below ~10 a fp16 overflow is near) and the
    count of non-finite outputs; any non-finite output makes the headroom 0 ("unsafe"). Values are
    kept as tensors until `metrics()` to avoid a device sync per layer. Maxima accumulate over all
    forwards inside the monitor.

    Args:
        model: an HF causal LM; its decoder layers' outputs are hooked.

    Raises:
        TypeError: `model` has no decoder layer stack (`modeling.decoder_layers`).
    """

    def __init__(self, model: torch.nn.Module):
        self.layers = decoder_layers(model)
        self.max_abs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.nonfinite: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list[Any] = []

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            h = (output[0] if isinstance(output, (tuple, list)) else output).detach()
            m, bad = h.abs().amax().float(), (~torch.isfinite(h)).sum()
            self.max_abs[i] = m if self.max_abs[i] is None else torch.maximum(self.max_abs[i], m)
            self.nonfinite[i] = bad if self.nonfinite[i] is None else self.nonfinite[i] + bad
        return hook

    def __enter__(self) -> ActivationMonitor:
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def all_reduce(self, group: Any = None, device: Any = "cpu") -> None:
        """Combine every rank's monitor in place: MAX of each layer's absmax, SUM of its non-finite count.

        After it every rank of `group` holds the figures a single process would have seen over all
        the ranks' forwards (a NaN absmax on any rank stays NaN; a layer no rank ran stays unseen).

        Args:
            group: the `torch.distributed` process group (None: the default group).
            device: where the reduced tensors live (the backend's device: CUDA under NCCL).
        """
        dist = torch.distributed
        n = len(self.max_abs)
        if n == 0:
            return
        absmax = torch.tensor([-1.0 if m is None else (math.inf if m.isnan() else float(m)) for m in self.max_abs],
                              dtype=torch.float64, device=device)
        counts = torch.tensor([[0.0 if c is None else float(c) for c in self.nonfinite],
                               [float(m is not None and bool(m.isnan())) for m in self.max_abs]],
                              dtype=torch.float64, device=device)
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        for i, (m, c, nan) in enumerate(zip(absmax.tolist(), *counts.tolist(), strict=True)):
            seen = m >= 0
            self.max_abs[i] = torch.tensor(math.nan if nan else m, dtype=torch.float32) if seen else None
            self.nonfinite[i] = torch.tensor(int(c)) if seen else None

    def metrics(self, prefix: str = "range/") -> dict[str, float]:
        """Flat float metrics of the forwards seen; empty when no forward ran inside the monitor.

        Args:
            prefix: prepended to every key.

        Returns:
            {"<prefix>act_absmax/layer<i>": max |output| of layer i (fp32 value), "<prefix>act_absmax":
            the largest (NaN counts as inf), "<prefix>fp16_headroom": 65504 / act_absmax (inf when 0;
            0.0 when any output was non-finite), "<prefix>act_nonfinite": count of non-finite
            elements}.
        """
        seen = [(i, m.item()) for i, m in enumerate(self.max_abs) if m is not None]
        if not seen:
            return {}
        out = {f"{prefix}act_absmax/layer{i}": v for i, v in seen}
        nonfinite = float(sum(n.item() for n in self.nonfinite if n is not None))
        top = max((v for _, v in seen), key=lambda v: math.inf if v != v else v)  # a NaN max counts as inf
        out[f"{prefix}act_absmax"] = top
        # any non-finite activation: headroom 0 ("unsafe"), never inf/NaN from 65504 / NaN
        safe = nonfinite == 0 and math.isfinite(top)
        out[f"{prefix}fp16_headroom"] = (FP16_MAX / top if top > 0 else float("inf")) if safe else 0.0
        out[f"{prefix}act_nonfinite"] = nonfinite
        return out
