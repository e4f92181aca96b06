"""HF safetensors from a megatron distributed checkpoint (`checkpointing.save_sharded`), offline, one process.

For users who trained with TP / EP: every rank's shards of the model (not the optimizer) are read
once as megatron global tensors (`dist_checkpointing.load` with unsharded templates built from
`load_tensors_metadata`: TP slices, GLU halves and EP expert numbering come back as the TP=1 / EP=1
tensors), converted to HF names (`convert.megatron_to_hf`, fp32 master values) and written with
safetensors into a folder swapped in atomically (`hf_export.write_hf_checkpoint`'s rules: temp
sibling, fsync, rename). The model is held once in memory (fp32) between read and write.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_hf_from_dist", "load_global_model_tensors", "unstack_layers"]


def _single_process_group() -> bool:
    """Start a one-process gloo group when none exists (dist_checkpointing reads ranks). True if started."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def load_global_model_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's global (unsharded) megatron tensors from a distributed checkpoint, fp32 master values.

    Args:
        directory: a folder written by `checkpointing.save_sharded`.

    Returns:
        `{megatron name: tensor}` as a TP=1 / EP=1 model names them, in the saved dtype.

    Raises:
        megatron `CheckpointingException`: the folder is not a distributed checkpoint.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(str(directory))
    template = {k: ShardedTensor.from_rank_offsets(k, torch.empty(sh.global_shape, dtype=sh.dtype), replica_id=0)
                for k, sh in meta.items() if not k.startswith("optimizer.")}
    return unstack_layers(dict(dist_checkpointing.load(template, str(directory))))


# megatron stores the local spec's norms under the TE spec's names (TE-compatible checkpoints)
_TE_NORMS = ((".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
             (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"))


def unstack_layers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron's checkpoint keys -> the per-layer parameter names of a local-spec `GPTModel`.

    `TransformerBlock.sharded_state_dict` stacks layers on a leading axis (`decoder.layers.X`,
    `[L, ...]`) and `SequentialMLP` stacks experts on the next (`mlp.experts.experts.X`,
    `[L, E, ...]`); norms fused into TE linears are named as TE names them.

    Args:
        sd: `{checkpoint key: global tensor}`.

    Returns:
        `{decoder.layers.{i}.… / …local_experts.{e}.…: tensor}` plus the non-layer entries unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("decoder.layers."):
            out[k] = v
            continue
        rest = "." + k[len("decoder.layers."):]
        for te, local in _TE_NORMS:
            rest = rest.replace(te, local)
        for i in range(v.shape[0]):
            if ".mlp.experts.experts." in rest:
                for e in range(v.shape[1]):
                    out[f"decoder.layers.{i}" + rest.replace(".experts.experts.", f".experts.local_experts.{e}.")] = v[i, e]
            else:
                out[f"decoder.layers.{i}{rest}"] = v[i]
    return out


def export_hf_from_dist(directory: str | os.PathLike, model_cfg: Mapping[str, Any], out: str | os.PathLike,
                        *, fused_experts: bool = True) -> Path:
    """Write the model of a distributed checkpoint as HF safetensors (`model.safetensors` + `config.json`).

    Args:
        directory: the distributed checkpoint folder (`save_sharded`; in a step dir: its `dist/`).
        model_cfg: the recipe's `model:` block (a `config` mapping or a local HF folder) the run trained.
        out: the HF folder to write (replaced atomically if it exists).
        fused_experts: MoE experts in transformers >= 5's fused layout (`convert.megatron_to_hf`).

    Returns:
        `out` as a Path.

    Raises:
        ValueError: the checkpoint was written for another model than `model_cfg` describes.
        NonFiniteError: a weight is NaN/inf; nothing is written.
    """
    import json
    import shutil

    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from nemo_rl_fp16.checkpoint import fsync_file, replace_dir
    from nemo_rl_fp16.guards import check_weights
    from nemo_rl_fp16.modeling.layout import ModelLayout
    from nemo_rl_fp16.policy.megatron.checkpointing import RECORD_KEY, describe_layout
    from nemo_rl_fp16.policy.megatron.convert import megatron_to_hf

    started = _single_process_group()
    try:
        if "config" in model_cfg:
            hf_config = dict(model_cfg["config"])
        else:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model_cfg["name_or_path"]).to_dict()
        lay = ModelLayout.from_hf_config(hf_config)
        saved = dist_checkpointing.load_common_state_dict(str(directory))[RECORD_KEY]
        want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(lay).items()}
        diff = sorted(k for k in want if saved["model"].get(k) != want[k])
        if diff:
            raise ValueError(f"{directory} ({describe_layout(saved)}) holds another model than model: describes ("
                             + ", ".join(f"{k}: {saved['model'].get(k)} vs {want[k]}" for k in diff[:4])
                             + "); pass the run's model: block")
        sd = megatron_to_hf(load_global_model_tensors(directory), lay, fused_experts=fused_experts)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    check_weights(sd, "HF export", None)
    out = Path(out)
    tmp = out.parent / f".tmp_{out.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True, default=str))
        for f in tmp.iterdir():
            fsync_file(f)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
