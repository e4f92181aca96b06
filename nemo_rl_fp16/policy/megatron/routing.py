"""Expert capture and routing replay on the megatron backend, through megatron-core's `RouterReplay`.

megatron-core (>= 0.16) routes each MoE layer through `TopKRouter.routing` ->
`topk_routing_with_score_function(..., router_replay=router.router_replay)`; with
`TransformerConfig.moe_enable_routing_replay=True` every router owns a `RouterReplay` whose action
(`RouterReplayAction.RECORD` / `REPLAY_FORWARD` / `REPLAY_BACKWARD`) decides the top-k: record the
router's own ids, or take given ids and *gather the router's own scores for them* (softmax over the
k logits, or the pre-softmax probabilities) — so the gate keeps its gradient under replay.

This module drives those instances per model (not through `RouterReplay`'s process-global static
API: the CPU path builds an fp32 master and a compute copy, and the loop a reference policy, each
with its own routers): `install_partial_replays` gives every router of a freshly built model its own
instance and takes megatron's out of the global registry (which would otherwise keep every model
built alive). One extension, `PartialRouterReplay`: megatron replays *every* token of the
forward, while the package replays only the positions that score response tokens (`moe_routing`
module doc) and lets the prompt keep the trainer's own routing. Its `REPLAY_FORWARD` therefore
accepts -1 rows (those tokens take the router's own top-k) and records the router's own ids
(the flip-rate side) in the same pass; everything else is megatron's.

Token order: megatron's router sees `[s * b, E]` logits, s-major, in the rotated row layout of
`MegatronCausalLM` (each row's first real token at position 0); `arm` rotates HF-position targets
with the same gather as the tokens, `collect` rotates the recorded ids back. `MegatronCausalLM`
(`model.py`) calls `arm` / `after_forward` around each forward; `MegatronPolicy` (`policy.py`) wraps
a `MegatronRouting` in the backend-neutral `policy.expert_routing.ExpertRouting`.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["MegatronRouting", "install_partial_replays", "partial_router_replay_class"]


def _replay_types():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    return RouterReplay, RouterReplayAction


@functools.cache
def partial_router_replay_class() -> type:
    """The `RouterReplay` subclass whose `REPLAY_FORWARD` targets may hold -1 rows (own routing).

    It also records the router's own top-k ids in that pass (module doc). One class per process.

    Returns:
        type: the `PartialRouterReplay` class (a subclass of megatron-core's `RouterReplay`).
    """
    RouterReplay, Action = _replay_types()

    class PartialRouterReplay(RouterReplay):
        def __init__(self):  # not registered in RouterReplay.global_router_replay_instances (module doc)
            self.target_topk_idx = None
            self.recorded_topk_idx = None
            self.router_replay_action = None
            self.replay_backward_list = []

        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            if self.router_replay_action != Action.REPLAY_FORWARD:
                return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
            _, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            target = self.target_topk_idx.to(scores.device)
            if target.shape != own.shape:
                raise ValueError(f"router replay: the router sees {tuple(own.shape)} (tokens, k), the replay holds "
                                 f"{tuple(target.shape)}")
            self.record_indices(own)
            idx = torch.where((target >= 0).all(-1, keepdim=True), target, own)
            return scores.gather(1, idx), idx

    return PartialRouterReplay


def install_partial_replays(gpt: torch.nn.Module) -> list:
    """Give each MoE router of `gpt` its own `PartialRouterReplay`, out of megatron's global registry.

    Idempotent (routers that already hold one keep it).

    Args:
        gpt: a (possibly wrapped) `GPTModel` built with `moe_enable_routing_replay=True`; a dense one
            has no routers.

    Returns:
        The `PartialRouterReplay` instances, one per MoE layer, in layer order.

    Raises:
        ValueError: an MoE router without a `RouterReplay` (built without `moe_enable_routing_replay`).
    """
    while hasattr(gpt, "module"):
        gpt = gpt.module
    RouterReplay, _ = _replay_types()
    cls = partial_router_replay_class()
    out = []
    for layer in gpt.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is None:
            continue
        old = getattr(router, "router_replay", None)
        if old is None:
            raise ValueError("megatron routing replay needs TransformerConfig.moe_enable_routing_replay=True")
        if not isinstance(old, cls):
            if old in RouterReplay.global_router_replay_instances:  # megatron's global registry: not used here
                RouterReplay.global_router_replay_instances.remove(old)
            router.router_replay = cls()
        out.append(router.router_replay)
    return out


class MegatronRouting:
    """Capture and replay on one megatron `GPTModel`'s routers (`expert_routing.RouterTaps`, as `RouterHooks`).

    Args:
        gpt: the (possibly wrapped) `GPTModel`, built with `moe_enable_routing_replay=True`.

    Attributes:
        replays: one `PartialRouterReplay` per MoE layer, in layer order.
        recording: when True, each forward keeps the routers' own top-k and the experts used.
        replay: None, or `[b * S, layers, k]` long expert ids in HF positions (row-major, as
            `moe_routing.replay_targets` builds them) for the next forward(s); -1 rows keep the
            router's own choice.

    Raises:
        ValueError: the model was built without `moe_enable_routing_replay`.
    """

    def __init__(self, gpt: torch.nn.Module):
        self.replays = install_partial_replays(gpt)
        self.recording = False
        self.replay: torch.Tensor | None = None
        self._own: torch.Tensor | None = None
        self._used: torch.Tensor | None = None
        self._src: torch.Tensor | None = None
        self._width = 0

    @property
    def num_layers(self) -> int:
        """MoE layers."""
        return len(self.replays)

    def arm(self, src: torch.Tensor, width: int | None = None) -> None:
        """Set each router's action before a forward over the rotated rows `input_ids.gather(1, src)`.

        Each layer replays its `[s * b, k]` ids (s-major, rotated like the tokens) when `replay` is
        set, else records its own top-k. The action stays set through the backward (activation
        recompute).

        Args:
            src: `[b, s]` long, the rotation `MegatronCausalLM` applies to the (padded) rows.
            width: the rows' real width before the sequence-parallel padding (None: `s`); the
                padding positions `width .. s - 1` route by the router's own choice and are not
                recorded.

        Raises:
            ValueError: `replay` does not hold `b * width` tokens for every MoE layer.
        """
        _, Action = _replay_types()
        self._src = src
        b, s = src.shape
        self._width = s if width is None else int(width)
        self._own = self._used = None
        for r in self.replays:
            r.clear_indices()
        if self.replay is None:
            for r in self.replays:
                r.set_router_replay_action(Action.RECORD)
            return
        t = self.replay.to(src.device)
        if t.shape[0] != b * self._width or t.shape[1] != len(self.replays):
            raise ValueError(f"router replay holds {tuple(t.shape)} (tokens, layers, k), the forward runs {b} x "
                             f"{self._width} tokens through {len(self.replays)} MoE layers")
        k = t.shape[-1]
        t = t.reshape(b, self._width, -1, k)
        if s > self._width:  # sequence-parallel padding: the router's own choice (-1)
            t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, s - self._width), value=-1)
        rotated = t.gather(1, src[:, :, None, None].expand(b, s, t.shape[2], k))  # [b, s(rotated), L, k]
        per_token = rotated.transpose(0, 1).reshape(s * b, -1, k)  # s-major, as the router flattens
        for i, r in enumerate(self.replays):
            r.set_target_indices(per_token[:, i].contiguous())
            r.set_router_replay_action(Action.REPLAY_FORWARD)

    def after_forward(self, routing_maps: dict[int, torch.Tensor], top_k: int) -> None:
        """Keep the last forward's expert ids, rotated back to HF positions (when `recording`).

        Args:
            routing_maps: each MoE layer's `routing_map` (`[s * b, E]` bool, s-major), by layer index:
                the experts the forward used; the routers' own ids come from their `RouterReplay`.
            top_k: experts per token.
        """
        if not self.recording or self._src is None:
            return
        b, s = self._src.shape
        w = self._width
        back = torch.argsort(self._src, dim=1)[:, :w]  # HF position j < width sits at rotated index back[:, j]

        def unrotate(tok_k: torch.Tensor) -> torch.Tensor:
            rows = tok_k.reshape(s, b, -1).transpose(0, 1)  # [b, s(rotated), k]
            return rows.gather(1, back[..., None].expand(b, w, rows.shape[-1])).sort(-1).values

        self._own = torch.stack([unrotate(r.get_recorded_indices().long()) for r in self.replays], dim=2)
        self._used = torch.stack([unrotate(routing_maps[i].int().topk(top_k, dim=-1).indices)
                                  for i in sorted(routing_maps)], dim=2)

    def collect(self, which: str, batch: int, seq: int) -> torch.Tensor:
        """`[batch, seq, layers, k]` ids of the last recorded forward (`which`: "own" or "used").

        Args:
            which (str): `own` (the routers' own top-k) or `used` (the experts the forward routed to).
            batch (int): rows of that forward.
            seq (int): its sequence length.

        Returns:
            torch.Tensor: `[batch, seq, layers, k]` int64 expert ids, in token order (sequence-parallel rotation undone), sorted within k.

        Raises:
            RuntimeError: no forward of that shape was recorded (recording was off).
        """
        out = self._own if which == "own" else self._used
        if out is None or tuple(out.shape[:2]) != (batch, seq):
            raise RuntimeError("megatron routing: no recorded forward of that shape (recording was off)")
        return out

