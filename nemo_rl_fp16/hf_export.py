"""HF export: a policy's weights as an HF folder (config.json, safetensors, tokenizer), atomically.

Used for the end-of-run export (`trainer.export_hf`) and by the vLLM engine, which loads from
disk. The folder is written to a temporary sibling, fsynced, then swapped in (`checkpoint`'s
atomic directory replace), so a crash never leaves a half-written model.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_rl_fp16.checkpoint import fsync_file, replace_dir
from nemo_rl_fp16.guards import check_weights
from nemo_rl_fp16.modeling.hf import build_model, load_weights_


def export_hf(path: str | os.PathLike, model, tokenizer=None, step: int | None = None) -> Path:
    """`save_pretrained` (safetensors) of model (+ tokenizer) into `path`, swapped in atomically.

    Written to `.tmp_<name>_<pid>` beside `path`, fsynced, then renamed over `path` (an existing
    folder is replaced, `checkpoint.replace_dir`); on error the temp folder is removed.

    Args:
        model: an HF `PreTrainedModel`, saved in its own parameter dtype.
        path: the export folder.
        tokenizer: saved into the same folder when given.
        step: the RL step, for the refusal message.

    Returns:
        `path` as a `Path`.

    Raises:
        NonFiniteError: a weight is NaN/inf; nothing is written.
    """
    check_weights(model.state_dict(), "HF export", step)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp_{path.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers < 5
        kwargs["safe_serialization"] = True
    try:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            fsync_file(f)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_hf_checkpoint(model_cfg: Mapping[str, Any], path: str | os.PathLike, tokenizer: Any,
                        state_dict: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                        step: int | None = None) -> Path:
    """An HF folder (config.json, fp32 model.safetensors, tokenizer) of policy weights, atomically.

    `model_cfg` is a recipe `model:` block: the model is built from it (a seeded init for
    `config`, the local checkpoint for `name_or_path`), then `state_dict` (fp32, HF names, e.g.
    the trainer's `rollout_state_dict()`) overwrites its weights. The config carries the
    tokenizer's special ids, so the folder loads in vLLM and `AutoModelForCausalLM` alike.

    Args:
        model_cfg: the recipe's `model:` block (see `modeling.build_model`).
        path: the export folder (replaced atomically, see `export_hf`).
        tokenizer: the run's tokenizer; its pad/eos/bos ids go into config.json and
            generation_config.json, and it is saved into the folder.
        state_dict: HF name -> tensor to load (None: keep the built model's weights).
        seed: seeds the random init of a `config` model.
        step: the RL step, for the refusal message.

    Returns:
        `path` as a `Path`.

    Raises:
        NonFiniteError: a weight of `state_dict` is NaN/inf; nothing is written.
        ValueError: `model_cfg` is malformed, or `state_dict` has unknown/missing names or shape
            mismatches (`modeling.build_model`, `modeling.load_weights_`).
        FileNotFoundError: `model_cfg.name_or_path` is not a loadable local checkpoint.
    """
    if state_dict is not None:
        check_weights(state_dict, "HF export", step)
    model = build_model(model_cfg, torch.float32, seed=seed)
    if state_dict is not None:
        load_weights_(model, state_dict)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        val = getattr(tokenizer, key, None)
        if val is not None:
            setattr(model.config, key, val)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, key, val)
    return export_hf(path, model, tokenizer, step=step)
