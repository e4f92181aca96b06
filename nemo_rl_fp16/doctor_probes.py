"""Probe points of the mismatch doctor: where it hooks an HF model and a megatron `GPTModel`.

Both maps use the HF rollout path's names, so the two paths line up point by point:

| probe name | HF (`Qwen2/Qwen3/Llama/Mixtral...`) | megatron-core `GPTModel` (`MegatronCausalLM`) |
|---|---|---|
| `layers.i.input_layernorm` | `layers[i].input_layernorm` | `decoder.layers[i].input_layernorm` (TE spec: fused into `linear_qkv`, not visible) |
| `layers.i.self_attn` | `layers[i].self_attn` (o_proj output, bias included) | `self_attention` (`linear_proj` output + its bias) |
| `layers.i.post_attention_layernorm` | `post_attention_layernorm` | `pre_mlp_layernorm` (TE spec: fused into `linear_fc1`, not visible) |
| `layers.i.mlp.gate` (MoE) | the top-k router: its logits `[tokens, experts]` | `mlp.router`: `gating()`'s logits |
| `layers.i.mlp` | `mlp` (MLP / sparse-MoE block output) | `mlp` (MLP / `MoELayer` output + bias) |
| `layers.i` | the decoder block output (residual stream) | `decoder.layers[i]` output |
| `norm` | final norm (last hidden state) | `decoder.final_layernorm` |
| `logits` | `lm_head` | `output_layer` (this rank's vocabulary shard) |

Every point's output is brought to `[rows, positions, width]` in HF token positions: HF outputs
are batch-major already (routers flatten to `[rows * positions, experts]`: reshaped); megatron's
are sequence-major and each row is rotated so its first real token sits at position 0
(`MegatronCausalLM`): transposed and rotated back with the row's leading-padding count. Router
points also give each token's own top-k expert ids `[rows, positions, k]` (sorted): HF recomputes
the router's own choice `topk(softmax(fp32 logits))` (what the router picks before any R3 replay
hook rewrites it), megatron reads its `routing_map`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from nemo_rl_fp16.modeling import decoder_layers
from nemo_rl_fp16.modeling.moe_routing import hf_routers

#: the parts of a decoder block probed (HF names), in forward order; missing ones are skipped
BLOCK_PARTS = (("input_layernorm", "input norm"), ("self_attn", "attention output"),
               ("post_attention_layernorm", "post-attention norm"), ("mlp", "MLP/MoE output"))
ROUTER_WHAT = "router logits (MoE gate)"


class Probe(NamedTuple):
    """One probe point: a module whose forward output the doctor records.

    Attributes:
        name: the HF-style name (`layers.1.mlp`, `norm`, `logits`, ...), the same on both paths.
        what: a short description for the report ("attention output", ...).
        module: the hooked module.
        extract: `(output, ctx) -> [rows, positions, width]` tensor in HF token positions, the
            module's output dtype; `ctx` is `Recorder.ctx`.
        ids: routers only: `(output, ctx) -> [rows, positions, k]` int64 expert ids the router
            picked, sorted ascending; None for other points.
    """

    name: str
    what: str
    module: torch.nn.Module
    extract: Callable[[Any, dict], torch.Tensor]
    ids: Callable[[Any, dict], torch.Tensor] | None = None


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def is_megatron(model: torch.nn.Module) -> bool:
    """Whether `model` is the megatron trainer's `MegatronCausalLM` wrapper.

    Args:
        model: any module.

    Returns:
        True for a `policy.megatron.model.MegatronCausalLM` (that module imports no megatron-core).
    """
    from nemo_rl_fp16.policy.megatron.model import MegatronCausalLM

    return isinstance(model, MegatronCausalLM)


def _hf_router_of(layer: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, torch.nn.Module):
        return None
    routers = hf_routers(mlp)
    return next(((name, mod) for name, mod in mlp.named_modules() if any(mod is r for r in routers)), None)


def hf_probes(model: torch.nn.Module) -> list[Probe]:
    """Probe points of an HF causal LM in forward order (module doc's table, HF column).

    Args:
        model: an HF causal LM (Llama/Qwen/Mixtral layout: `get_decoder()` or `.model` holding
            `layers`); MoE routers are found with `modeling.moe_routing.hf_routers`.

    Returns:
        The probe points, in forward order.

    Raises:
        TypeError: the model has no decoder layer stack (from `modeling.decoder_layers`).
    """
    def router_logits(out, ctx):
        return out[0].reshape(ctx["rows"], -1, out[0].shape[-1])

    def router_ids(router):
        def ids(out, ctx):
            probs = torch.softmax(out[0].float(), dim=-1)  # the HF routers' own top-k, before any replay
            return probs.topk(int(router.top_k), dim=-1).indices.sort(-1).values.reshape(ctx["rows"], -1, int(router.top_k))
        return ids

    pts = []
    for i, layer in enumerate(decoder_layers(model)):
        for part, what in BLOCK_PARTS:
            sub = getattr(layer, part, None)
            if not isinstance(sub, torch.nn.Module):
                continue
            if part == "mlp" and (found := _hf_router_of(layer)) is not None:
                pts.append(Probe(f"layers.{i}.mlp.{found[0]}", ROUTER_WHAT, found[1], router_logits,
                                 router_ids(found[1])))
            pts.append(Probe(f"layers.{i}.{part}", what, sub, lambda out, ctx: _first(out)))
        pts.append(Probe(f"layers.{i}", "block output (residual stream)", layer, lambda out, ctx: _first(out)))
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    norm = getattr(inner, "norm", None)
    if isinstance(norm, torch.nn.Module):
        pts.append(Probe("norm", "final norm (last hidden state)", norm, lambda out, ctx: _first(out)))
    head = model.get_output_embeddings()
    if head is not None:
        pts.append(Probe("logits", "logits (lm_head)", head, lambda out, ctx: _first(out)))
    return pts


def _unrotate(t: torch.Tensor, ctx: dict) -> torch.Tensor:
    """`[s, b, w]` (or `[s * b, w]`) megatron output -> `[b, s, w]` in HF positions (module doc)."""
    shift = ctx["shift"]
    b = shift.shape[0]
    t = t.reshape(-1, b, t.shape[-1]).transpose(0, 1)  # [b, s, w], rotated rows
    s = t.shape[1]
    ar = torch.arange(s, device=t.device)
    back = (ar[None, :] - shift.to(t.device)[:, None]) % s
    return t.gather(1, back[..., None].expand(b, s, t.shape[-1]))


def _with_bias(out: Any, ctx: dict) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        h, bias = out[0], out[1] if len(out) > 1 else None
        out = h + bias if isinstance(bias, torch.Tensor) else h
    return _unrotate(out, ctx)


def megatron_probes(model: torch.nn.Module) -> tuple[list[Probe], dict[str, str]]:
    """Probe points of a `MegatronCausalLM` under the HF names (module doc's table, megatron column).

    Args:
        model: the megatron trainer's `MegatronCausalLM` (its `GPTModel` may be wrapped in
            `Float16Module` / DDP).

    Returns:
        (the probe points in forward order, {HF name: why not visible} for the points this model
        cannot show: a norm the Transformer Engine spec fuses into the next linear).
    """
    from megatron.core.transformer.identity_op import IdentityOp

    gpt = model.module
    while hasattr(gpt, "module"):
        gpt = gpt.module
    pts: list[Probe] = []
    unseen: dict[str, str] = {}
    parts = (("input_layernorm", "input_layernorm", "input norm", "linear_qkv"),
             ("self_attention", "self_attn", "attention output", None),
             ("pre_mlp_layernorm", "post_attention_layernorm", "post-attention norm", "linear_fc1"),
             ("mlp", "mlp", "MLP/MoE output", None))

    def router_ids(k):
        def ids(out, ctx):
            rmap = out[1]  # routing_map [tokens (s-major), E] bool
            return _unrotate(rmap.int().topk(k, dim=-1).indices.sort(-1).values, ctx)
        return ids

    for i, layer in enumerate(gpt.decoder.layers):
        for mname, hf, what, fused in parts:
            sub = getattr(layer, mname, None)
            if sub is None or isinstance(sub, IdentityOp):
                if fused:
                    unseen[f"layers.{i}.{hf}"] = f"megatron fuses it into {fused} (Transformer Engine spec)"
                continue
            router = getattr(sub, "router", None) if mname == "mlp" else None
            if router is not None:
                pts.append(Probe(f"layers.{i}.mlp.gate", ROUTER_WHAT, router,
                                 lambda out, ctx: _unrotate(out[0], ctx), router_ids(int(router.topk))))
            pts.append(Probe(f"layers.{i}.{hf}", what, sub, _with_bias))
        pts.append(Probe(f"layers.{i}", "block output (residual stream)", layer,
                         lambda out, ctx: _unrotate(_first(out), ctx)))
    norm = getattr(gpt.decoder, "final_layernorm", None)
    if isinstance(norm, torch.nn.Module) and not isinstance(norm, IdentityOp):
        pts.append(Probe("norm", "final norm (last hidden state)", norm, lambda out, ctx: _unrotate(_first(out), ctx)))
    else:
        unseen["norm"] = "megatron fuses the final norm into the output layer (Transformer Engine spec)"
    pts.append(Probe("logits", "logits (output_layer, this rank's vocabulary shard)", gpt.output_layer,
                     lambda out, ctx: _unrotate(_first(out), ctx)))
    return pts, unseen


def probes(model: torch.nn.Module) -> tuple[list[Probe], dict[str, str]]:
    """The probe points of an HF causal LM or a `MegatronCausalLM`, and what the model cannot show.

    Args:
        model: an HF causal LM or the megatron trainer's `MegatronCausalLM`.

    Returns:
        (probe points in forward order, {name: why not visible}; always {} for an HF model).
    """
    if is_megatron(model):
        return megatron_probes(model)
    return hf_probes(model), {}


class Recorder:
    """Forward hooks on the probe points of `model` keeping a window of positions of each output.

    Before each forward of a micro-batch the caller sets `begin(rows, attention_mask)` (rows of
    the batch; megatron also needs the mask for its row rotation). `window(length) -> slice` picks
    the positions kept from an output of sequence length `length` (HF positions); kept outputs
    are stored detached in their own dtype and concatenated along positions by `outputs()`
    (router expert ids under `<name>:topk`), then along rows by the caller. Use as a context
    manager: hooks are registered on enter and removed on exit (a megatron router's `gating` is
    wrapped to keep its logits, and restored).

    Args:
        model: an HF causal LM or a `MegatronCausalLM` (see `probes`).
    """

    def __init__(self, model: torch.nn.Module):
        self.points, self.unseen = probes(model)
        self.window = lambda length: slice(0, length)
        self.ctx: dict[str, Any] = {"rows": 1, "shift": None}
        self._seen: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._gating: list[torch.nn.Module] = []

    def begin(self, rows: int, attention_mask: torch.Tensor | None = None) -> None:
        """Start a micro-batch: the context the extractors read.

        Args:
            rows: rows of the micro-batch (HF routers flatten rows and positions).
            attention_mask: `[rows, seq]` 1 on real tokens; megatron's extractors undo the row
                rotation with its leading-padding count (None: no rotation, HF).
        """
        shift = None
        if attention_mask is not None:
            shift = (attention_mask.long().cumsum(-1) == 0).sum(-1)  # leading padding per row
        self.ctx = {"rows": rows, "shift": shift}

    def _keep(self, name: str, t: torch.Tensor) -> None:
        self._seen.setdefault(name, []).append(t.detach()[:, self.window(t.shape[1])].clone())

    def _hook(self, p: Probe):
        def hook(module, _inputs, output):
            if p.ids is not None and hasattr(module, "gating"):  # megatron router: (logits, routing_map)
                output = (module._doctor_logits, output[1])
            self._keep(p.name, p.extract(output, self.ctx))
            if p.ids is not None:
                self._keep(f"{p.name}:topk", p.ids(output, self.ctx))
        return hook

    def __enter__(self) -> Recorder:
        for p in self.points:
            if p.ids is not None and hasattr(p.module, "gating"):
                gating = p.module.gating

                def stash(x, _m=p.module, _g=gating):
                    _m._doctor_logits = _g(x)
                    return _m._doctor_logits
                p.module.gating = stash  # instance attribute over the method; removed on exit
                self._gating.append(p.module)
        self._handles = [p.module.register_forward_hook(self._hook(p)) for p in self.points]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for m in self._gating:
            del m.gating
            m.__dict__.pop("_doctor_logits", None)
        self._handles, self._gating = [], []

    def outputs(self) -> dict[str, torch.Tensor]:
        """The outputs recorded so far, concatenated along positions; clears the record.

        Returns:
            Name -> `[rows, positions, width]` tensor in the module's output dtype (router expert
            ids under `<name>:topk`, `[rows, positions, k]` int64); points that saw no forward are
            left out.
        """
        out = {n: torch.cat(v, 1) for n, v in self._seen.items() if v}
        self._seen = {}
        return out
