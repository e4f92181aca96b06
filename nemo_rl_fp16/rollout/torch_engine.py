"""`TorchRolloutEngine`: a real KV-cached batched sampler over the HF model, in the rollout dtype.

It is the CPU default rollout engine and the second implementation that produces a genuine
training-inference mismatch: it holds its own copy of the weights in `policy.param_dtype`, runs
one prefill over the left-padded prompts and then decodes token by token with a KV cache (HF
`DynamicCache`, whose dtype follows the model's: checked against `policy.kv_cache_dtype`), while
the trainer scores the same tokens with one full-sequence forward. In fp32 both agree to ~1e-6;
in fp16/bf16 they differ by rounding noise, bf16 much more (arXiv 2510.26788).

MoE models (HF Qwen2-MoE, Qwen3-MoE, Mixtral): the engine records the experts each router picked
at the position scoring each response token (the prefill's last position for the first token, the
decode steps after it) in `RolloutBatch.rollout_experts` (`[N, T, moe layers, k]` int16, -1 on
padding; `moe_routing`), for `mismatch/router_topk_flip_rate` and routing replay (R3).

Log-prob semantics (`rollout_logp`): fp32 `log_softmax(logits / temperature)` of the sampled
token, computed from the model's low-precision logits *before* top-p truncation — the quantity
the trainer computes, so that π and µ are compared like for like. With `top_p = 1` it is exactly
the log-prob of the distribution sampled from. Greedy decoding (`temperature = 0`) is scored at
temperature 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from nemo_rl_fp16.guards import NonFiniteError
from nemo_rl_fp16.interfaces import RolloutBatch, SamplingParams
from nemo_rl_fp16.modeling import build_model, cache_kwarg, load_weights_, logprob_table, position_ids_from_mask
from nemo_rl_fp16.modeling.moe_routing import (
    EXPERT_DTYPE,
    PAD_EXPERT,
    RouterHooks,
    router_compute_audit,
    run_gates_in_weight_dtype,
)
from nemo_rl_fp16.precision import PrecisionMismatchError, PrecisionPolicy, audit_model, dtype_name
from nemo_rl_fp16.precision.cpu_numerics import cpu_numerics, kernel_profile


class TorchRolloutEngine:
    """RolloutEngine over an HF causal LM with KV-cached decoding (see module doc).

    Args:
        model_cfg: the recipe's `model:` block (see `modeling.build_model`).
        policy: the rollout-side precision policy (`param_dtype`, `kv_cache_dtype`, `logits_dtype`).
        pad_token_id: fills left padding of prompts and the tail of finished responses.
        eos_token_id: one id or several; a row stops after emitting any of them.
        device: torch device of the model.
        initial_state_dict: fp32 HF state dict to start from (else the seeded random/checkpoint init).
        max_batch_size: rows decoded together; larger batches are processed in chunks.
        seed: seeds the random init of a `config`-built model (same default as the trainer's).

    Raises:
        PrecisionMismatchError: `policy.kv_cache_dtype` differs from `param_dtype` (HF DynamicCache
            stores keys/values in the model dtype).
        ValueError: `max_batch_size` < 1, a malformed `model_cfg` (`modeling.build_model`), or an
            `initial_state_dict` that does not match the model (`modeling.load_weights_`).
        FileNotFoundError: `model_cfg.name_or_path` is not a loadable local checkpoint.
    """

    def __init__(self, model_cfg: Mapping[str, Any], policy: PrecisionPolicy, *, pad_token_id: int,
                 eos_token_id: int | Sequence[int] | None, device: torch.device | str = "cpu",
                 initial_state_dict: Mapping[str, torch.Tensor] | None = None,
                 max_batch_size: int = 64, seed: int = 0):
        if policy.kv_cache_dtype != policy.param_dtype:
            raise PrecisionMismatchError("torch rollout engine", [
                f"kv_cache_dtype {dtype_name(policy.kv_cache_dtype)} != param_dtype "
                f"{dtype_name(policy.param_dtype)}: HF DynamicCache stores keys/values in the model dtype"])
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.precision = policy
        self.device = torch.device(device)
        self.pad_token_id = int(pad_token_id)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = tuple(int(e) for e in eos)
        self.max_batch_size = int(max_batch_size)
        self.model = build_model(model_cfg, policy.param_dtype, seed=seed, device=self.device,
                                 router_dtype=policy.router_dtype)
        if policy.router_dtype != policy.param_dtype:  # e.g. an fp32 router: gate logits, softmax, top-k in it
            run_gates_in_weight_dtype(self.model)
        self._cache_kw = cache_kwarg(self.model)
        #: dtypes of the KV cache observed at the last prefill (for `audit`)
        self.last_kv_cache_dtypes: set[torch.dtype] = set()
        routing = RouterHooks(self.model)
        #: MoE router hooks recording the experts picked (None for a dense model)
        self.routing: RouterHooks | None = routing if routing.routers else None
        if initial_state_dict is not None:
            self.update_weights(initial_state_dict)

    # ------------------------------------------------------------------ RolloutEngine
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Refit from fp32 master weights (HF names), cast in place; all-or-nothing.

        Args:
            state_dict: fp32 HF-named weights (`PolicyEngine.rollout_state_dict`).

        Raises:
            ValueError: unknown / missing names or shape mismatches (`modeling.load_weights_`).
        """
        load_weights_(self.model, state_dict)

    def load_stream(self, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 256 * 2**20) -> int:
        """Refit from streamed `(HF name, tensor)` pairs in buckets (`rollout.refit`, direct transport).

        Bitwise the same weights as `update_weights`; peak extra memory one bucket.

        Args:
            named: the weights, consumed lazily.
            bucket_bytes: the bucket size in bytes.

        Returns:
            The bytes moved (rollout dtype).

        Raises:
            ValueError: an unknown name, a shape mismatch, or weights the stream missed.
        """
        from nemo_rl_fp16.rollout.refit import iter_buckets

        self.begin_refit()
        for bucket in iter_buckets(named, self.precision.param_dtype, bucket_bytes):
            self.load_bucket(bucket.meta.to_wire(), bucket.buffer)
            del bucket  # released before the next bucket is allocated
        return self.end_refit()

    def begin_refit(self) -> None:
        """Start a bucket-by-bucket refit (`load_bucket` per bucket, then `end_refit`)."""
        self._refit = (self.model.state_dict(), set(), [0])

    def load_bucket(self, meta: dict, buffer: torch.Tensor) -> int:
        """Copy one bucket (`refit.BucketMeta.to_wire()` + its flat uint8 buffer) into the model.

        Args:
            meta: the bucket's metadata as plain data.
            buffer: the bucket's buffer (any device; copied into the model's device and dtype).

        Returns:
            The bucket's bytes.

        Raises:
            ValueError: an unknown name, a shape mismatch or a name sent twice (nothing of the bucket copied).
        """
        from nemo_rl_fp16.rollout.refit import BucketMeta, load_bucket_into

        own, seen, sent = self._refit
        m = BucketMeta.from_wire(meta)
        load_bucket_into(own, m, buffer, seen)
        sent[0] += m.nbytes
        return m.nbytes

    def end_refit(self) -> int:
        """Finish a bucketed refit: every weight must have come.

        Returns:
            The bytes loaded since `begin_refit`.

        Raises:
            ValueError: weights no bucket carried (named, up to 5).
        """
        own, seen, sent = self._refit
        self._refit = None
        if set(own) - seen:
            raise ValueError(f"refit stream missed {len(set(own) - seen)} weight(s), e.g. {sorted(set(own) - seen)[:5]}")
        return sent[0]

    def audit(self) -> list[str]:
        """Parameter dtypes against the policy, plus the KV cache dtypes seen at the last prefill.

        Returns:
            One line per finding; empty when the engine matches `precision`.
        """
        lines = audit_model(self.model, self.precision) + router_compute_audit(self.routing, self.precision.router_dtype)
        bad = sorted(dtype_name(d) for d in self.last_kv_cache_dtypes if d != self.precision.kv_cache_dtype)
        if bad:
            lines.append(f"<kv cache>: found {', '.join(bad)}, expected "
                         f"{dtype_name(self.precision.kv_cache_dtype)} (kv_cache_dtype)")
        return lines

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `num_generations` responses per prompt (rows of one prompt consecutive).

        Seeded by `params.seed` (a `torch.Generator`): the same seed, prompts and batch size give
        the same samples. Returned tensors are on CPU; the response width is the longest response.

        Args:
            prompts: unpadded token ids, none empty.
            params: sampling settings.

        Returns:
            A `RolloutBatch` (`interfaces.py` layout), `extras["truncated"]` `[N]` bool, and
            `rollout_experts` `[N, T, layers, k]` int16 for MoE models.

        Raises:
            ValueError: bad prompts or `params`.
            guards.NonFiniteError: NaN/inf logits.
            PrecisionMismatchError: the KV cache is not in `precision.kv_cache_dtype`, or (MoE) the
                prefill's gate logits are not in `precision.router_dtype`.
        """
        _check_params(prompts, params)
        g = params.num_generations
        rows = [list(p) for p in prompts for _ in range(g)]
        width = max(len(p) for p in prompts)
        stop = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)) or [-1],
                            device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(params.seed)
        chunks = []
        with torch.no_grad(), cpu_numerics(self.device, self.precision.param_dtype):
            for start in range(0, len(rows), self.max_batch_size):
                chunks.append(self._generate_chunk(rows[start:start + self.max_batch_size], width, params, gen, stop))
        n_resp = max(c["tokens"].shape[1] for c in chunks)
        cols = {k: torch.cat([_pad_right(c[k], n_resp, fill) for c in chunks])
                for k, fill in (("tokens", self.pad_token_id), ("mask", 0), ("logp", 0.0))}
        prompt_ids = torch.cat([c["prompt_ids"] for c in chunks])
        prompt_mask = torch.cat([c["prompt_mask"] for c in chunks])
        experts = None
        if self.routing is not None:  # [N, T, layers, k], -1 beyond each chunk's width and on padding
            experts = torch.cat([torch.nn.functional.pad(c["experts"], (0, 0, 0, 0, 0, n_resp - c["experts"].shape[1]),
                                                         value=PAD_EXPERT) for c in chunks])
        return RolloutBatch(
            input_ids=torch.cat([prompt_ids, cols["tokens"]], 1),
            attention_mask=torch.cat([prompt_mask, cols["mask"]], 1),
            response_mask=cols["mask"],
            rollout_logp=cols["logp"],
            prompt_width=width,
            prompt_index=torch.arange(len(prompts)).repeat_interleave(g),
            rollout_experts=experts,
            extras={"truncated": torch.cat([c["truncated"] for c in chunks])},
        )

    # ------------------------------------------------------------------ internals
    def forward_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """One forward of the sampler (prefill or one decode step), extending `cache` in place.

        `generate` calls it for the prefill and, under `kernel_profile("decode")`, per new token;
        the mismatch doctor replays fixed tokens through it (`doctor.decode_path`). Call it inside
        the engine's numerics scope (`precision.cpu_numerics`) and `torch.no_grad()`.

        Args:
            input_ids: `[b, s]` new token ids (the left-padded prompts, or one token per row).
            attention_mask: `[b, cached + s]` 1 on real tokens, 0 on padding.
            position_ids: `[b, s]` positions of the new tokens (`modeling.position_ids_from_mask`).
            cache: the rows' KV cache (`transformers.DynamicCache`).

        Returns:
            `[b, vocab]` logits of the last position, in the model's output dtype.
        """
        if self.routing is not None:
            self.routing.recording = True
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        finally:
            if self.routing is not None:
                self.routing.recording = False
        return out.logits[:, -1]

    def _last_experts(self, b: int, s: int) -> torch.Tensor | None:
        """`[b, layers, k]` experts of the last forward's last position (None for a dense model)."""
        return None if self.routing is None else self.routing.collect("own", b, s)[:, -1].cpu()

    def _generate_chunk(self, rows: list[list[int]], width: int, params: SamplingParams,
                        gen: torch.Generator, stop: torch.Tensor) -> dict[str, torch.Tensor]:
        b, dev = len(rows), self.device
        prompt_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(rows):  # left padding
            prompt_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            prompt_mask[i, width - len(p):] = 1
        attn = prompt_mask.to(dev)
        cache = DynamicCache(config=self.model.config)
        logits = self.forward_step(prompt_ids.to(dev), attn, position_ids_from_mask(attn), cache)
        routed = [self._last_experts(b, width)]  # routed[t]: the routing that scored response token t
        self.last_kv_cache_dtypes = _cache_dtypes(cache)
        if (self.last_kv_cache_dtypes - {self.precision.kv_cache_dtype}
                or router_compute_audit(self.routing, self.precision.router_dtype)):
            raise PrecisionMismatchError("torch rollout engine", self.audit())

        alive = torch.ones(b, dtype=torch.bool, device=dev)
        tokens, logps, masks = [], [], []
        for step in range(params.max_new_tokens):
            tok, lp = sample_tokens(logits, params.temperature, params.top_p, gen, self.precision.logits_dtype)
            tok = torch.where(alive, tok, self.pad_token_id)
            tokens.append(tok)
            logps.append(torch.where(alive, lp, 0.0))
            masks.append(alive.long())
            alive = alive & ~torch.isin(tok, stop)
            if not bool(alive.any()) or step == params.max_new_tokens - 1:
                break
            attn = torch.cat([attn, masks[-1][:, None]], 1)
            with kernel_profile("decode"):  # one query row per sequence: the decode kernels
                logits = self.forward_step(tok[:, None], attn, position_ids_from_mask(attn)[:, -1:], cache)
            routed.append(self._last_experts(b, 1))
        mask = torch.stack(masks, 1).cpu()
        experts = None
        if self.routing is not None:  # [b, T, layers, k], -1 on padding
            experts = torch.stack(routed, 1).to(EXPERT_DTYPE).masked_fill(~mask.bool()[:, :, None, None], PAD_EXPERT)
        return {"experts": experts, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "tokens": torch.stack(tokens, 1).cpu(), "mask": mask,
                "logp": torch.stack(logps, 1).float().cpu(), "truncated": alive.cpu()}


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator,
                  logits_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from `[B, V]` logits.

    Sampling is inverse-CDF in fp64 from one `torch.rand` draw per row of `gen`, so the same
    logits and generator state give the same tokens on every CPU. Nucleus sampling keeps the
    smallest set of most likely tokens whose cumulative probability reaches `top_p` (the top
    token always survives) and renormalises over it.

    Args:
        logits: `[B, V]` last-position logits in the model dtype.
        temperature: 0 is greedy (argmax), scored at 1.
        top_p: nucleus mass in (0, 1].
        gen: the generator the draws come from.
        logits_dtype: the policy's `logits_dtype` (fp32).

    Returns:
        (tokens `[B]` int64, their log-probs `[B]` in `logits_dtype`, computed before top-p).

    Raises:
        guards.NonFiniteError: NaN/inf logits (never sampled from).
    """
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(f"rollout engine: non-finite logits ({int((~torch.isfinite(logits)).sum())} of "
                             f"{logits.numel()} in {logits.dtype}): the policy diverged or its forward overflows")
    logp = logprob_table(logits, temperature, logits_dtype)
    if temperature == 0:
        tok = logp.argmax(-1)
    else:
        probs = logp.double().exp()
        if top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
            sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        # inverse-CDF sampling in fp64 (sequential cumsum, one uniform per row): unlike
        # torch.multinomial, its result does not depend on the host's vector width
        cdf = probs.cumsum(-1)
        u = torch.rand((probs.shape[0], 1), generator=gen, dtype=torch.float64, device=probs.device)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def _cache_dtypes(cache: Any) -> set[torch.dtype]:
    """Key/value dtypes of every layer of an HF cache (transformers 5 `layers`, or 4.x lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:  # pragma: no cover - older transformers
        tensors = list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
    return {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


def _pad_right(t: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype)], 1)


def _check_params(prompts: list[list[int]], params: SamplingParams) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and no empty prompt")
    if params.max_new_tokens < 1 or params.num_generations < 1:
        raise ValueError(f"max_new_tokens and num_generations must be >= 1, got "
                         f"{params.max_new_tokens}, {params.num_generations}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
