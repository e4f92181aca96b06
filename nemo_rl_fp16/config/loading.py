"""Recipe files: find a packaged recipe or a YAML path, compose `defaults:`, apply dotlist overrides, save.

Load -> compose -> override -> resolve -> validate (`config.schema.validate`); the result is a
plain OmegaConf `DictConfig` with every key filled in (`typed` gives the pydantic view).
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_rl_fp16.config.schema import ConfigError, validate
from nemo_rl_fp16.precision import PRESETS


def recipes_dir() -> Path:
    """Folder of the recipes packaged with nemo_rl_fp16 (inside the wheel).

    Returns:
        The path of `nemo_rl_fp16/recipes` (it exists in an installed package).
    """
    return Path(str(resources.files("nemo_rl_fp16") / "recipes"))


def available_recipes() -> list[str]:
    """Names of the packaged recipes (YAML stems under `recipes_dir()`), sorted.

    Returns:
        The recipe names, e.g. ["ablate_bf16_rollout_fp16_train", "base", "demo_tiny", ...].
    """
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
    """Dotlist overrides; a preset swap (`precision=bf16`) first, then the dotted keys, whatever their order.

    The preset only sets `precision.name`: every explicit `precision.*` key (from the recipe or the
    command line) stays and applies on top of the preset.
    """
    presets = [o for o in overrides if o.partition("=")[0].strip().lstrip("+") == "precision"]
    for item in [*presets, *(o for o in overrides if o not in presets)]:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. trainer.max_steps=3)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("+")
        if key == "precision":  # precision=bf16 swaps the preset; every explicit precision.* key stays
            if value not in PRESETS:
                raise ConfigError(f"bad value for 'precision': '{value}'; allowed: {', '.join(PRESETS)}")
            cfg = OmegaConf.merge(cfg, {"precision": {"name": value}})  # type: ignore[assignment]
            continue
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))  # type: ignore[assignment]
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot apply override '{item}': {' '.join(str(e).split())}") from None
    return cfg


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a packaged recipe by name or a YAML path, apply dotlist overrides, validate.

    Args:
        name_or_path: a packaged recipe name (`available_recipes`) or a YAML file path.
        overrides: OmegaConf dotlist items, `key=value`.

    Returns:
        The resolved, validated config with every key filled in (defaults included).

    Raises:
        ConfigError: one line per bad key / value (unknown key with the nearest valid one, wrong
            type, bad choice), an unknown recipe, or an unresolvable interpolation.
    """
    cfg = _apply_overrides(_compose(_find(name_or_path)), list(overrides))
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve recipe: {' '.join(str(e).split())}") from None
    typed = validate(data)  # type: ignore[arg-type]
    return OmegaConf.create(typed.model_dump(mode="json"))


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML text (OmegaConf's dump, keys in the config's order).

    Args:
        cfg: the config to dump.

    Returns:
        The YAML text.
    """
    return OmegaConf.to_yaml(cfg)


def save_resolved(cfg: DictConfig, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config to `<out_dir>/config.yaml` atomically (`fsutil.atomic_write`).

    Args:
        cfg: the loaded config (from `load_recipe`).
        out_dir: the run folder; created if missing.

    Returns:
        The path of the written `config.yaml`.
    """
    from nemo_rl_fp16.fsutil import atomic_write

    return atomic_write(Path(out_dir) / "config.yaml", to_yaml(cfg))
