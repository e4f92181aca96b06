"""MoE routing of the HF families: capture each token's top-k experts, replay recorded ones (R3).

For an MoE policy the largest π-vs-µ divergence is often not rounding inside a layer but a
different expert choice: a tiny gate-logit difference flips the top-k and the token goes through
other weights. This module hooks the routers of the HF families the package supports
(`Qwen2MoeTopKRouter`, `Qwen3MoeTopKRouter`, `MixtralTopKRouter`: `forward(hidden [tokens, h])
-> (router_logits, routing_weights [tokens, k], expert_ids [tokens, k])`) to

- record the expert ids each router picked (`RouterHooks.recording`), so that the rollout engine
  can carry its choices in `RolloutBatch.rollout_experts` and the trainer can measure
  `mismatch/router_topk_flip_rate` against them;
- replay given expert ids (`RouterHooks.replay`, rollout routing replay "R3", Ma et al. 2025,
  arXiv 2510.11370): the token goes to the recorded experts, and their routing weights are the
  trainer's *own* softmax probabilities of those experts (renormalised over the k as the router
  does), so the gate keeps its gradient and keeps learning.

Alignment (the `[N, T, layers, k]` layout of `RolloutBatch.rollout_experts`): entry t of a row is
the routing at the position whose logits score response token t, i.e. position `P + t - 1`
(the last prompt token for t = 0), in every MoE layer in model order; entries of padding tokens
(response_mask 0) are -1. Replay applies to exactly those positions; the other prompt positions
keep the trainer's own routing (both engines run the prompt through their prefill kernels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nemo_rl_fp16.precision.audit import is_router_param
from nemo_rl_fp16.precision.policy import dtype_name

#: HF `model_type`s whose MoE routers this module hooks (and whose configs plan/validation accept
#: for `policy.router_replay`).
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral")
#: expert-id dtype of `RolloutBatch.rollout_experts` and of the trainer's selected experts
EXPERT_DTYPE = torch.int16
PAD_EXPERT = -1
#: `policy.router_replay`: own routing, the rollout's recorded experts (R3), the trainer's own
#: old-logprob-pass experts in the update passes (R2)
ROUTER_REPLAY_CHOICES = ("none", "rollout", "trainer")


def _router_classes() -> tuple[type, ...]:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return (Qwen2MoeTopKRouter, Qwen3MoeTopKRouter, MixtralTopKRouter)


def hf_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-k routers of an HF Qwen2-MoE / Qwen3-MoE / Mixtral model, in layer order.

    Args:
        model: any module; its submodules are matched against the HF router classes.

    Returns:
        The routers in `model.modules()` order (= layer order); [] for a dense model.
    """
    classes = _router_classes()
    return [m for m in model.modules() if isinstance(m, classes)]


def is_moe_model_config(model_cfg: Mapping[str, Any]) -> bool | None:
    """Whether a recipe's `model:` block is one of `MOE_MODEL_TYPES`, without loading the model.

    Reads `model.config.model_type`, or `config.json` of a local `name_or_path` directory.

    Args:
        model_cfg: the `model:` block as a mapping (`config` or `name_or_path`).

    Returns:
        True / False from the model type; None when it cannot be known (no `config` and no local
        `config.json`).
    """
    import json
    import os

    config = model_cfg.get("config")
    if config:
        return config.get("model_type") in MOE_MODEL_TYPES
    path = model_cfg.get("name_or_path")
    cfg_file = os.path.join(str(path), "config.json") if path else None
    if cfg_file and os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            return json.load(f).get("model_type") in MOE_MODEL_TYPES
    return None


def _normalises(router: torch.nn.Module) -> bool:
    # Mixtral always renormalises the top-k probabilities; Qwen MoE routers follow `norm_topk_prob`
    return bool(getattr(router, "norm_topk_prob", True))


class RouterHooks:
    """Forward hooks on every HF MoE router of `model` (see module doc).

    The hooks are registered at construction; call `remove()` to take them off.

    Args:
        model: an HF causal LM (a dense model gets no hooks; `top_k` then fails).

    Attributes:
        routers: the hooked routers, layer order.
        recording: when True, each router's forward stores its own top-k ids (`own[i]`,
            `[tokens, k]` long) and the ids the layer then used (`used[i]`, = own without replay).
        replay: None, or `[tokens, layers, k]` long expert ids for the next forward(s): rows with
            all k ids >= 0 are routed to them (weights from the router's own probabilities), rows
            holding -1 keep the router's choice. A forward whose token count differs from the
            replay's raises ValueError from the hook.
        logits_dtypes: dtypes of the gate logits seen since construction (every forward; for the
            engines' audit of `router_dtype`).
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = hf_routers(model)
        self.recording = False
        self.replay: torch.Tensor | None = None
        self.logits_dtypes: set[torch.dtype] = set()
        self.own: list[torch.Tensor | None] = [None] * len(self.routers)
        self.used: list[torch.Tensor | None] = [None] * len(self.routers)
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    @property
    def num_layers(self) -> int:
        """MoE layers hooked."""
        return len(self.routers)

    @property
    def top_k(self) -> int:
        """Experts per token (`top_k` of the first router; HF MoE models use one k)."""
        return int(self.routers[0].top_k)

    def remove(self) -> None:
        """Remove the forward hooks from the routers."""
        for h in self._handles:
            h.remove()

    def _hook(self, i: int):
        def hook(mod, _inp, out):
            logits, scores, ids = out
            self.logits_dtypes.add(logits.dtype)
            if self.replay is None:
                if self.recording:
                    self.own[i] = self.used[i] = ids.detach()
                return None
            target = self.replay[:, i].to(ids.device)
            if target.shape != ids.shape:
                raise ValueError(f"router replay: layer {i} routes {tuple(ids.shape)} (tokens, k), replay holds "
                                 f"{tuple(target.shape)}")
            new_ids = torch.where((target >= 0).all(-1, keepdim=True), target, ids)
            # the router's own probabilities of the replayed experts (fp32 softmax, as the HF routers)
            top = torch.softmax(logits.float(), dim=-1).gather(-1, new_ids)
            if _normalises(mod):
                top = top / top.sum(dim=-1, keepdim=True)
            if self.recording:
                self.own[i], self.used[i] = ids.detach(), new_ids.detach()
            return logits, top.to(scores.dtype), new_ids
        return hook

    def collect(self, which: str, batch: int, seq: int) -> torch.Tensor:
        """The expert ids of the last recorded forward, per position and MoE layer.

        Args:
            which: "own" (the routers' own top-k) or anything else for "used" (after replay).
            batch: rows of that forward.
            seq: positions per row of that forward (`batch * seq` = the routers' token count).

        Returns:
            `[batch, seq, layers, k]` int64 expert ids.

        Raises:
            RuntimeError: a router has no recorded forward (recording was off).
        """
        recs = self.own if which == "own" else self.used
        if any(r is None for r in recs):
            raise RuntimeError("router hooks: no recorded forward (recording was off)")
        return torch.stack([r.reshape(batch, seq, -1) for r in recs], dim=2)


def router_compute_audit(routing: RouterHooks | None, router_dtype: torch.dtype) -> list[str]:
    """The audit line for gate logits computed in another dtype than `router_dtype` (live forwards).

    Args:
        routing: the engine's router hooks (None: dense model, nothing to check).
        router_dtype: the side's `precision.router_dtype`.

    Returns:
        `["<router compute>: gate logits found <dtypes>, expected <dtype> (router_dtype)"]`, or []
        when every forward so far computed them in `router_dtype` (or none ran yet).
    """
    if routing is None:
        return []
    bad = sorted(dtype_name(d) for d in routing.logits_dtypes if d != router_dtype)
    if not bad:
        return []
    return [f"<router compute>: gate logits found {', '.join(bad)}, expected "
            f"{dtype_name(router_dtype)} (router_dtype)"]


def replay_targets(rollout_experts: torch.Tensor, prompt_width: int, seq_len: int) -> torch.Tensor:
    """`[n * seq_len, layers, k]` long replay ids for a forward over `[n, seq_len]` tokens.

    Response token t's experts go to position `prompt_width + t - 1` (module doc); every other
    position holds -1 (the router's own choice). Set the result as `RouterHooks.replay`.

    Args:
        rollout_experts: `[n, T, layers, k]` `RolloutBatch.rollout_experts` (int16, -1 on padding).
        prompt_width: P, the prompt width of the forward's rows.
        seq_len: S, the forward's sequence length (P + T for a full scoring forward).

    Returns:
        `[n * S, layers, k]` int64 ids on `rollout_experts`' device.
    """
    n, t, layers, k = rollout_experts.shape
    out = torch.full((n, seq_len, layers, k), PAD_EXPERT, dtype=torch.long, device=rollout_experts.device)
    width = min(t, seq_len - prompt_width + 1)
    out[:, prompt_width - 1: prompt_width - 1 + width] = rollout_experts[:, :width].long()
    return out.reshape(n * seq_len, layers, k)


def response_experts(per_position: torch.Tensor, prompt_width: int, response_mask: torch.Tensor) -> torch.Tensor:
    """Slice per-position expert ids to the response layout of `RolloutBatch.rollout_experts`.

    Args:
        per_position: `[n, S, layers, k]` ids of every position of a forward.
        prompt_width: `P`; response token t is scored at position `P + t - 1`.
        response_mask: `[n, T]` 1 on real response tokens.

    Returns:
        `[n, T, layers, k]` `EXPERT_DTYPE` (int16) ids of positions `P - 1 .. P + T - 2`, -1 where
        `response_mask` is 0.
    """
    t = response_mask.shape[1]
    out = per_position[:, prompt_width - 1: prompt_width - 1 + t].to(EXPERT_DTYPE)
    return out.masked_fill(~response_mask.to(out.device).bool()[:, :, None, None], PAD_EXPERT)



def _to_weight_dtype(mod: torch.nn.Module, args: tuple) -> tuple:
    mod._gate_input_dtype = args[0].dtype
    return (args[0].to(mod.weight.dtype), *args[1:])


def _back_to_input_dtype(mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.to(mod._gate_input_dtype)


def run_gates_in_weight_dtype(model: torch.nn.Module) -> list:
    """Run each MoE gate of an HF model in its weight's dtype (an fp32 router in an fp16/bf16 model).

    For `precision.router_dtype=float32`: the gate parameters are kept fp32 (`cast_params_`) and
    these hooks cast each gate's input to the weight dtype, so the gate logits, the softmax and the
    top-k are fp32. The top-k routers (`hf_routers`) return fp32 logits and routing weights (the
    experts multiply by them and add in the model dtype, as Mixtral's own fp32 weights do); a
    sigmoid gate whose output joins the hidden states (Qwen2-MoE's `shared_expert_gate`) returns its
    logits rounded back to the input's dtype, so the residual stream stays in the model dtype.
    Gates whose weight already has the input's dtype compute as before (the casts are no-ops).

    Args:
        model: an HF MoE causal LM (a dense model gets no hooks).

    Returns:
        The hook handles (`.remove()` takes them off).
    """
    routers = set(hf_routers(model))
    handles = []
    for name, mod in model.named_modules():
        if not isinstance(getattr(mod, "weight", None), torch.nn.Parameter) or not is_router_param(f"{name}.weight"):
            continue
        handles.append(mod.register_forward_pre_hook(_to_weight_dtype))
        if mod not in routers:  # a plain linear gate: its output rounded back to the input's dtype
            handles.append(mod.register_forward_hook(_back_to_input_dtype))
    return handles
