"""Recipes: OmegaConf YAML composed with `defaults:`, dotlist overrides, a strict typed schema.

Load -> compose -> override -> resolve -> validate, then hand a typed `RecipeConfig` to the
trainer. Every problem (unknown key, wrong type, bad choice) is reported at once, before any
work starts, as one line per problem naming the key, the value, the allowed values and the
nearest valid key.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nemo_rl_fp16.precision import PRESETS

DtypeName = Literal["float16", "bfloat16", "float32"]
Preset = Literal["fp16", "bf16", "fp32"]


class ConfigError(ValueError):
    """A recipe or override is invalid; the message has one line per problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossScaleSection(_Section):
    enabled: bool | None = None
    initial_scale: float | None = Field(None, gt=0)
    min_scale: float | None = Field(None, gt=0)
    growth_factor: float | None = Field(None, gt=1)
    backoff_factor: float | None = Field(None, gt=0, lt=1)
    growth_interval: int | None = Field(None, ge=1)
    hysteresis: int | None = Field(None, ge=1)


class PrecisionSection(_Section):
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


class ModelSection(_Section):
    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "set exactly one of model.name_or_path (a local HF checkpoint) or model.config "
                "(a model built from an HF config dict)"
            )
        return self


class LoraSection(_Section):
    enabled: bool = False
    rank: int = Field(1, ge=1)
    alpha: float = 32.0
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PolicySection(_Section):
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
    attention: Literal["auto", "te", "sdpa", "local"] = "auto"
    fused_elementwise: bool = False
    lora: LoraSection = LoraSection()


class RolloutSection(_Section):
    backend: Literal["torch", "vllm"] = "torch"
    num_generations: int = Field(8, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    enforce_eager: bool = False


class AlgorithmSection(_Section):
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
    dataset: str = "sanity_add"
    path: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: str = "plain"
    prompts_per_step: int = Field(8, ge=1)
    num_problems: int = Field(64, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> DataSection:
        if self.dataset == "jsonl" and not self.path:
            raise ValueError("data.dataset=jsonl needs data.path=<file.jsonl>")
        return self


class RewardSection(_Section):
    name: Literal["exact_match", "math_verify"] = "exact_match"


class WarmStartSection(_Section):
    enabled: bool = False
    steps: int = Field(70, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    cache_dir: str = "outputs/.cache/warm_start"


class TrainerSection(_Section):
    max_steps: int = Field(100, ge=0)
    eval_every: int = Field(0, ge=0)
    save_every: int = Field(10, ge=0)
    log_every: int = Field(1, ge=1)
    resume: str = "auto"
    keep_last: int = Field(2, ge=1)
    max_overflow_retries: int = Field(3, ge=0)
    headroom_every: int = Field(10, ge=0)
    export_hf: bool = False


class ToggleSection(_Section):
    enabled: bool = False
    project: str = "nemo_rl_fp16"


class LoggingSection(_Section):
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
    wandb: ToggleSection = ToggleSection()
    mlflow: ToggleSection = ToggleSection()


class RaySection(_Section):
    enabled: bool = False
    address: str | None = None
    layout: Literal["colocated", "split"] = "colocated"
    trainer_workers: int = Field(1, ge=1)
    rollout_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)


class ClusterSection(_Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    ray: RaySection = RaySection()


class MismatchSection(_Section):
    precisions: list[Preset] = ["fp32", "fp16", "bf16"]
    num_prompts: int = Field(64, ge=1)
    length_buckets: list[int] = [64, 256, 1024, 4096]


class RecipeConfig(_Section):
    recipe: str = Field("base", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")  # a name, never a path
    seed: int = 1234
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


# --------------------------------------------------------------------------------- loading


def recipes_dir() -> Path:
    """Folder of the recipes packaged with nemo_rl_fp16 (inside the wheel)."""
    return Path(str(resources.files("nemo_rl_fp16") / "recipes"))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _find(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return p
    packaged = recipes_dir() / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    close = difflib.get_close_matches(name_or_path, available_recipes(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown recipe '{name_or_path}'{hint} (packaged: {', '.join(available_recipes())}; "
        f"or pass a path to a .yaml file)"
    )


def _compose(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file merged on top of its `defaults:` (earlier entries first)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"recipe defaults form a cycle: {' -> '.join(p.name for p in (*seen, path))}")
    try:
        node = OmegaConf.load(path)  # yaml.SafeLoader underneath
    except Exception as e:  # yaml errors carry line numbers: keep them on one line
        raise ConfigError(f"cannot parse recipe {path}: {' '.join(str(e).split())}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {path} must be a YAML mapping at the top level")
    defaults = node.pop("defaults", [])
    merged = OmegaConf.create()
    for parent in defaults or []:
        parent_path = path.parent / f"{parent}.yaml"
        if not parent_path.is_file():
            parent_path = _find(str(parent))
        merged = OmegaConf.merge(merged, _compose(parent_path, (*seen, path)))
    if "recipe" not in node:
        node.recipe = path.stem
    return OmegaConf.merge(merged, node)  # type: ignore[return-value]


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. trainer.max_steps=3)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("+")
        if key == "precision":  # precision=bf16 swaps the preset; ablation settings stay
            if value not in PRESETS:
                raise ConfigError(f"bad value for 'precision': '{value}'; allowed: {', '.join(PRESETS)}")
            old = cfg.get("precision") or {}
            keep = {k: old[k] for k in ("rollout", "allow_mismatch") if k in old}
            cfg.precision = OmegaConf.create({"name": value, **keep})
            continue
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))  # type: ignore[assignment]
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot apply override '{item}': {' '.join(str(e).split())}") from None
    return cfg


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
            lines.append(f"unknown key '{key}' (value {value!r}); {hint}")
        elif e["type"] == "literal_error":
            lines.append(f"bad value for '{key}': {value!r}; allowed: {e['ctx']['expected']}")
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{key + ': ' if key else ''}{msg}")
        elif e["type"] == "string_pattern_mismatch" and key == "recipe":
            lines.append(f"bad value for 'recipe': {value!r}; a recipe name is letters, digits and _ . + - "
                         "(no '/', spaces or a leading '.'); it names the run's output folder")
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            lines.append(f"bad value for '{key}': {value!r} ({e['msg'].lower()})")
    return "\n".join(lines)


def validate(data: dict) -> RecipeConfig:
    """Typed config from a plain dict; `ConfigError` with every problem otherwise."""
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, data)) from None


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a packaged recipe by name or a YAML path, apply dotlist overrides, validate.

    Returns the resolved, validated config with every key filled in (defaults included).
    Raises `ConfigError` naming each bad key / value.
    """
    cfg = _apply_overrides(_compose(_find(name_or_path)), list(overrides))
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve recipe: {' '.join(str(e).split())}") from None
    typed = validate(data)  # type: ignore[arg-type]
    return OmegaConf.create(typed.model_dump(mode="json"))


def typed(cfg: DictConfig | dict) -> RecipeConfig:
    """The pydantic view of a loaded recipe (attribute access with types)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return validate(data)  # type: ignore[arg-type]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def save_resolved(cfg: DictConfig, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config to `<out_dir>/config.yaml` atomically."""
    from nemo_rl_fp16.fsutil import atomic_write

    return atomic_write(Path(out_dir) / "config.yaml", to_yaml(cfg))
