"""The recipe schema: pydantic sections of `RecipeConfig`, and `validate` / `typed` with one-line errors.

Every problem (unknown key, wrong type, bad choice, a refused combination) is reported at once,
before any work starts, as one line per problem naming the key, the value, the allowed values and
the nearest valid key. Loading, composing and overriding YAML recipes: `config.loading`.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from nemo_rl_fp16.precision import precision_problems

DtypeName = Literal["float16", "bfloat16", "float32"]
Preset = Literal["fp16", "bf16", "fp32"]


class ConfigError(ValueError):
    """A recipe or override is invalid; the message has one line per problem."""


def refuse(line: str) -> PydanticCustomError:
    """A validator's refusal, reported verbatim by `validate` (not rewritten like pydantic's errors).

    Args:
        line: the whole message: one line naming the key, the value, the allowed values and the
            fix (braces are escaped, so the text is kept as is).

    Returns:
        A `PydanticCustomError` of type "refused" for the validator to raise.
    """
    return PydanticCustomError("refused", line.replace("{", "{{").replace("}", "}}"))


class _Section(BaseModel):
    # extra=forbid: unknown keys are errors; allow_inf_nan=False: every float key is finite
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LossScaleSection(_Section):
    """`precision.loss_scale`: dynamic loss scaling overrides (None: the preset's value).

    Defaults live in one place (`precision.loss_scale.LossScaleConfig`); min_scale <= initial_scale.
    """

    enabled: bool | None = None
    initial_scale: float | None = Field(None, gt=0)
    min_scale: float | None = Field(None, gt=0)
    growth_factor: float | None = Field(None, gt=1)
    backoff_factor: float | None = Field(None, gt=0, lt=1)
    growth_interval: int | None = Field(None, ge=1)
    hysteresis: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> LossScaleSection:
        lo, hi = self.min_scale or 1.0, self.initial_scale or 2.0**16
        if lo > hi:
            key = "min_scale" if self.min_scale is not None else "initial_scale"
            raise refuse(f"bad value for 'precision.loss_scale.{key}': {getattr(self, key):g}; allowed: "
                         f"min_scale <= initial_scale (here {lo:g} > {hi:g}); lower min_scale or raise initial_scale")
        return self


class PrecisionSection(_Section):
    """`precision`: the preset (`fp16`/`bf16`/`fp32`), per-dtype overrides, the rollout side's preset.

    Resolved into trainer and rollout `PrecisionPolicy` objects by `precision.policy.resolve_policies`;
    a trainer/rollout difference needs `allow_mismatch=true` (a declared ablation).
    """

    name: Preset = "fp16"
    param_dtype: DtypeName | None = None
    compute_dtype: DtypeName | None = None
    grad_reduce_dtype: DtypeName | None = None
    master_dtype: DtypeName | None = None
    logits_dtype: DtypeName | None = None
    router_dtype: DtypeName | None = None
    kv_cache_dtype: DtypeName | None = None
    loss_scale: LossScaleSection = LossScaleSection()
    rollout: Preset | None = None
    allow_mismatch: bool = False
    preflight: Literal["warn", "refuse", "off"] = "warn"

    @field_validator("preflight", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 (OmegaConf) reads a bare `off` as false


class ModelSection(_Section):
    """`model`: exactly one of a local HF checkpoint (`name_or_path`) or an HF config dict (`config`)."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False

    @field_validator("config")
    @classmethod
    def _hf_config(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """The dict must build an HF config (types checked by transformers' strict config classes)."""
        if v is None:
            return v
        if "model_type" not in v:
            raise refuse(f"missing key 'model.config.model_type' (keys given: {', '.join(sorted(v)) or 'none'}); "
                         f"set model.config.model_type=qwen2 (or another transformers model type)")
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        kw = dict(v)
        model_type = kw.pop("model_type")
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            raise refuse(f"bad value for 'model.config.model_type': {model_type!r}; allowed: a transformers model "
                         f"type{' (did you mean ' + ', '.join(close) + '?)' if close else ''}")
        try:
            AutoConfig.for_model(model_type, **kw)
        except Exception as e:  # transformers' strict dataclass validation names the field
            field = getattr(e, "field", None) or next((k for k in kw if f"'{k}'" in str(e)), None)
            what = " ".join(str(e).split())
            if field is not None:
                raise refuse(f"bad value for 'model.config.{field}': {kw.get(field)!r}; {what.split(': ', 1)[-1]}; "
                             f"fix model.config.{field}") from None
            raise refuse(f"model.config does not build a {model_type} config: {what}; fix model.config") from None
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "set exactly one of model.name_or_path (a local HF checkpoint) or model.config "
                "(a model built from an HF config dict)"
            )
        return self


class LoraSection(_Section):
    """`policy.lora`: LoRA adapters on the torch policy (peft `LoraConfig(r=rank, lora_alpha=alpha)`)."""

    enabled: bool = False
    rank: int = Field(1, ge=1)
    alpha: float = 32.0
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PolicySection(_Section):
    """`policy`: the π engine: backend, AdamW and clipping, micro-batch, parallel sizes, attention, R3, LoRA."""

    backend: Literal["torch", "megatron"] = "torch"
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    expert_parallel_size: int = Field(1, ge=1)
    context_parallel_size: int = Field(1, ge=1)
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    sequence_packing: bool = False
    attention: Literal["auto", "te", "sdpa", "local"] = "auto"
    fused_elementwise: bool = False
    use_distributed_optimizer: bool | None = None
    router_replay: Literal["none", "rollout", "trainer"] = "none"
    lora: LoraSection = LoraSection()


class RolloutSection(_Section):
    """`rollout`: the µ engine: backend, group size, sampling (`SamplingParams`), vLLM settings."""

    backend: Literal["torch", "vllm"] = "torch"
    num_generations: int = Field(8, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    enforce_eager: bool = False
    refit_bucket_mb: float = Field(256.0, gt=0)
    refit_transport: Literal["auto", "object_store", "broadcast", "ipc"] = "auto"


class AlgorithmSection(_Section):
    """`algorithm`: the loss (`algorithms.losses.policy_loss`): objective, TIS/MIS correction, clipping, reduction, KL."""

    name: Literal["grpo", "gspo", "pg_seq_is"] = "grpo"
    correction: Literal["none", "tis", "mis"] = "none"
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    is_cap: float = Field(2.0, gt=0)
    reduction: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    normalize_std: bool = True
    kl_coef: float = Field(0.0, ge=0)
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    updates_per_rollout: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _pairing(self) -> AlgorithmSection:
        if self.correction == "tis" and self.name != "grpo":
            raise ValueError(
                f"algorithm.correction=tis is token-level and only pairs with algorithm.name=grpo "
                f"(got {self.name}); use correction=mis or none"
            )
        return self


class DataSection(_Section):
    """`data`: the dataset (generated sanity tasks or JSONL), prompts per step, problem counts."""

    dataset: str = "sanity_add"
    path: str | None = None
    eval_path: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: str = "plain"
    prompts_per_step: int = Field(8, ge=1)
    num_problems: int = Field(64, ge=1)
    eval_num_problems: int = Field(32, ge=1)
    seed: int = Field(0, ge=0)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from nemo_rl_fp16.data.sanity import DATASETS

        names = [*sorted(DATASETS), "jsonl"]
        if v not in names:
            close = difflib.get_close_matches(v, names, n=1)
            raise refuse(f"bad value for 'data.dataset': {v!r}; allowed: {', '.join(names)}"
                         f"{'; did you mean ' + repr(close[0]) + '?' if close else ''}")
        return v

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> DataSection:
        if self.dataset == "jsonl" and not self.path:
            raise ValueError("data.dataset=jsonl needs data.path=<file.jsonl>")
        return self


class RewardSection(_Section):
    """`reward`: the reward function (`data.rewards`)."""

    name: Literal["exact_match", "math_verify"] = "exact_match"
    workers: int | None = Field(None, ge=0)


class WarmStartSection(_Section):
    """`warm_start`: the SFT warm start before RL (`warm_start.py`), cached by content hash."""

    enabled: bool = False
    steps: int = Field(70, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    cache_dir: str = "outputs/.cache/warm_start"


class TrainerSection(_Section):
    """`trainer`: the RL loop: steps, eval, checkpoints, resume, overflow retries, fp16 headroom monitor."""

    max_steps: int = Field(100, ge=0)
    eval_every: int = Field(0, ge=0)
    eval_k: int = Field(4, ge=1)
    save_every: int = Field(10, ge=0)
    log_every: int = Field(1, ge=1)
    resume: str = "auto"
    keep_last: int = Field(2, ge=1)
    max_overflow_retries: int = Field(3, ge=0)
    headroom_every: int = Field(10, ge=0)
    export_hf: bool = False


class ToggleSection(_Section):
    """An on/off experiment logger (`logging.wandb`, `logging.mlflow`) and its project name."""

    enabled: bool = False
    project: str = "nemo_rl_fp16"


class LoggingSection(_Section):
    """`logging`: metric sinks (`loggers.py`)."""

    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
    wandb: ToggleSection = ToggleSection()
    mlflow: ToggleSection = ToggleSection()


class RaySection(_Section):
    """`cluster.ray`: engines as Ray actors (`distributed/`): layout, worker counts, CPUs per worker."""

    enabled: bool = False
    address: str | None = None
    layout: Literal["colocated", "split"] = "colocated"
    trainer_workers: int = Field(1, ge=1)
    rollout_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)


class ClusterSection(_Section):
    """`cluster`: nodes and GPUs per node (placement and the launchers), and Ray."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    gpu_memory_gb: float = Field(0.0, ge=0)
    ray: RaySection = RaySection()


class MismatchSection(_Section):
    """`mismatch`: the offline π-vs-µ check (`nemo-rl-fp16 mismatch`) and the length buckets of the metrics."""

    precisions: list[Preset] = Field(["fp32", "fp16", "bf16"], min_length=1)
    num_prompts: int = Field(64, ge=1)
    length_buckets: list[int] = Field([64, 256, 1024, 4096], min_length=1)

    @field_validator("length_buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if v[0] < 1 or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise refuse(f"bad value for 'mismatch.length_buckets': {v}; allowed: strictly increasing response "
                         f"lengths >= 1, e.g. [64, 256, 1024]")
        return v


class RecipeConfig(_Section):
    """A whole recipe, typed: every key of `recipes/base.yaml` with its type, bounds and default.

    Built by `typed` / `validate`; `_cross_checks` refuses combinations (keys that do not apply
    to the chosen backend, unimplemented settings) with one line each. Every key is listed in
    `docs/recipes.md` (generated) and has an entry in `tests/unit/test_every_key.py`.
    """

    recipe: str = Field("base", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")  # a name, never a path
    seed: int = Field(1234, ge=0, lt=2**63)
    output_dir: str = "outputs/base"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: PrecisionSection = PrecisionSection()
    model: ModelSection
    policy: PolicySection = PolicySection()
    rollout: RolloutSection = RolloutSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    data: DataSection = DataSection()
    reward: RewardSection = RewardSection()
    warm_start: WarmStartSection = WarmStartSection()
    trainer: TrainerSection = TrainerSection()
    logging: LoggingSection = LoggingSection()
    cluster: ClusterSection = ClusterSection()
    mismatch: MismatchSection = MismatchSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> RecipeConfig:
        """Checks that span sections: dtype combinations each engine honours, eval data."""
        lines = precision_problems(self.precision.model_dump(), trainer=self.policy.backend,
                                   rollout=self.rollout.backend)
        lines += self._inapplicable()
        if self.trainer.eval_every and self.data.dataset == "jsonl" and not self.data.eval_path:
            lines.append(f"trainer.eval_every={self.trainer.eval_every} with data.dataset=jsonl needs held-out "
                         f"problems: set data.eval_path=<eval.jsonl> (or trainer.eval_every=0)")
        if lines:
            raise refuse("\n".join(lines))
        return self

    def _inapplicable(self) -> list[str]:
        """Keys documented as "X only" set to a non-default value where X is off: refused, not ignored."""
        groups = (
            ("policy", self.policy, ("sequence_parallel", "attention", "fused_elementwise",
                                     "use_distributed_optimizer"),
             self.policy.backend != "megatron", "policy.backend=megatron"),
            ("rollout", self.rollout, ("tensor_parallel_size", "gpu_memory_utilization", "enforce_eager"),
             self.rollout.backend != "vllm", "rollout.backend=vllm"),
            ("rollout", self.rollout, ("refit_bucket_mb",),  # the vLLM engine's refit and the Ray refit read it
             self.rollout.backend != "vllm" and not self.cluster.ray.enabled,
             "rollout.backend=vllm or cluster.ray.enabled=true"),
            ("rollout", self.rollout, ("refit_transport",), not self.cluster.ray.enabled, "cluster.ray.enabled=true"),
            ("data", self.data, ("path", "prompt_key", "answer_key", "template"),
             self.data.dataset != "jsonl", "data.dataset=jsonl"),
        )
        out = []
        for section, model, keys, off, needs in groups:
            for key in keys if off else ():
                value, default = getattr(model, key), type(model).model_fields[key].default
                if value != default:
                    shown = str(value).lower() if isinstance(value, bool) else value
                    fix = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
                    out.append(f"bad value for '{section}.{key}': {shown}; allowed: {fix} (the default) unless "
                               f"{needs}, which alone reads it; set {section}.{key}={fix} or {needs}")
        return out


# --------------------------------------------------------------------------------- validation


def _schema_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = RecipeConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None
    return model


def _format_errors(err: ValidationError, data: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc)
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            parent = _schema_at(loc[:-1])
            valid = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = (f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close
                    else f"valid keys here: {', '.join(valid)}")
            if key == "rehearse":  # the `rehearse` command's own options (`commands/rehearse.py`)
                hint = "rehearse.* options belong to the rehearse command: nemo-rl-fp16 rehearse recipe=... rehearse.steps=N"
            lines.append(f"unknown key '{key}' (value {value!r}); {hint}")
        elif e["type"] == "literal_error":
            lines.append(f"bad value for '{key}': {value!r}; allowed: {e['ctx']['expected']}")
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{key + ': ' if key else ''}{msg}")
        elif e["type"] == "refused":  # our validators' full lines (may be several)
            lines += str(e["msg"]).splitlines()
        elif e["type"] == "string_pattern_mismatch" and key == "recipe":
            lines.append(f"bad value for 'recipe': {value!r}; a recipe name is letters, digits and _ . + - "
                         "(no '/', spaces or a leading '.'); it names the run's output folder")
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:  # pydantic's "Input should be ..." states what is allowed
            allowed = str(e["msg"]).removeprefix("Input should be ").removeprefix("input should be ")
            lines.append(f"bad value for '{key}': {value!r}; allowed: {allowed}; set {key} accordingly")
    return "\n".join(lines)


def validate(data: dict) -> RecipeConfig:
    """Typed config from a plain dict.

    Args:
        data: the recipe as nested plain containers.

    Returns:
        The validated `RecipeConfig`.

    Raises:
        ConfigError: one line per problem.
    """
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, data)) from None


def typed(cfg: DictConfig | dict) -> RecipeConfig:
    """The pydantic view of a loaded recipe (attribute access with types).

    Args:
        cfg: a config from `load_recipe` (interpolations are resolved) or the same as a plain dict.

    Returns:
        The validated `RecipeConfig`.

    Raises:
        ConfigError: `cfg` does not validate (one line per problem; see `validate`).
    """
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return validate(data)  # type: ignore[arg-type]
