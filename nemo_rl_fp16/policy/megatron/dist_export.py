"""HF safetensors from a megatron distributed checkpoint (`checkpointing.save_sharded`), offline, one process.

For users who trained with TP / EP: every rank's shards of the model (not the optimizer) are read
once as megatron global tensors (`dist_checkpointing.load` with unsharded templates built from
`load_tensors_metadata`: TP slices, GLU halves and EP expert numbering come back as the TP=1 / EP=1
tensors), converted to HF names (`convert.megatron_to_hf`, fp32 master values) and written with
safetensors into a folder swapped in atomically (`hf_export.write_hf_checkpoint`'s rules: temp
sibling, fsync, rename).

Streamed: the export reads the embedding / final norm / output layer, then one decoder layer at a
time (megatron stores layers stacked on a leading axis; each read loads only that layer's slice,
`ShardedTensor.from_rank_offsets(..., (0, i, L))`), converts it to HF names
(`convert.megatron_part_to_hf`), checks it is finite and appends it to the current safetensors
shard; a shard is written and freed once it holds `max_shard_bytes`. The folder gets HF's sharded
layout (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`; one
`model.safetensors` when everything fits in one shard). Peak memory: one shard plus one layer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_hf_from_dist", "load_global_model_tensors", "unstack_layers"]

#: Default shard size of the streamed export (HF's `save_pretrained` default is 5 GB too).
MAX_SHARD_BYTES = 5 * 2**30


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


def unstack_layers(sd: Mapping[str, torch.Tensor], first_layer: int = 0) -> dict[str, torch.Tensor]:
    """Megatron's checkpoint keys -> the per-layer parameter names of a local-spec `GPTModel`.

    `TransformerBlock.sharded_state_dict` stacks layers on a leading axis (`decoder.layers.X`,
    `[L, ...]`) and `SequentialMLP` stacks experts on the next (`mlp.experts.experts.X`,
    `[L, E, ...]`); norms fused into TE linears are named as TE names them.

    Args:
        sd: `{checkpoint key: global tensor}` (layer keys: a slice of the layer axis).
        first_layer: the global index of the slice's first layer.

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
                    out[f"decoder.layers.{first_layer + i}" + rest.replace(".experts.experts.",
                                                                           f".experts.local_experts.{e}.")] = v[i, e]
            else:
                out[f"decoder.layers.{first_layer + i}{rest}"] = v[i]
    return out


def _model_parts(directory: str, num_layers: int):
    """Yield (first layer or None, megatron tensors): the non-layer entries, then one decoder layer at a time."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    meta = {k: sh for k, sh in dist_checkpointing.load_tensors_metadata(directory).items()
            if not k.startswith("optimizer.")}
    top = {k: ShardedTensor.from_rank_offsets(k, torch.empty(sh.global_shape, dtype=sh.dtype), replica_id=0)
           for k, sh in meta.items() if not k.startswith("decoder.layers.")}
    yield None, dict(dist_checkpointing.load(top, directory))
    stacked = {k: sh for k, sh in meta.items() if k.startswith("decoder.layers.")}
    for i in range(num_layers):
        one = {k: ShardedTensor.from_rank_offsets(k, torch.empty((1, *sh.global_shape[1:]), dtype=sh.dtype),
                                                  (0, i, sh.global_shape[0]), replica_id=0)
               for k, sh in stacked.items()}
        # one slice of each layer-stacked tensor: megatron's access check wants whole tensors covered, off here
        yield i, unstack_layers(dict(dist_checkpointing.load(one, directory, validate_access_integrity=False)),
                                first_layer=i)


class _ShardWriter:
    """safetensors shards of at most `max_bytes` (one tensor may exceed it), then HF's index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            size = v.numel() * v.element_size()
            if self.pending and sum(t.numel() * t.element_size() for t in self.pending.values()) + size > self.max_bytes:
                self.flush()
            v = v.contiguous()
            if any(v.data_ptr() == t.data_ptr() for t in self.pending.values()):
                v = v.clone()  # a tied lm_head: safetensors refuses tensors that share memory
            self.pending[k] = v
            self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f".part{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending = {}

    def finish(self) -> None:
        import json

        self.flush()
        n = len(self.files)
        if n == 1:
            (self.folder / self.files[0][0]).rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for j, (name, keys) in enumerate(self.files):
            final = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_hf_from_dist(directory: str | os.PathLike, model_cfg: Mapping[str, Any], out: str | os.PathLike,
                        *, fused_experts: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the model of a distributed checkpoint as HF safetensors, streamed layer by layer (module doc).

    Args:
        directory: the distributed checkpoint folder (`save_sharded`; in a step dir: its `dist/`).
        model_cfg: the recipe's `model:` block (a `config` mapping or a local HF folder) the run trained.
        out: the HF folder to write (replaced atomically if it exists).
        fused_experts: MoE experts in transformers >= 5's fused layout (`convert.megatron_to_hf`).
        max_shard_bytes: bytes per safetensors shard (one `model.safetensors` when all fit).

    Returns:
        `out` as a Path, holding `config.json` and `model.safetensors` or HF's shards + index;
        the tensors are bitwise the fp32 masters `megatron_to_hf` gives from the whole model.

    Raises:
        ValueError: the checkpoint was written for another model than `model_cfg` describes.
        NonFiniteError: a weight is NaN/inf; nothing is written at `out`.
    """
    import json
    import shutil

    from megatron.core import dist_checkpointing

    from nemo_rl_fp16.checkpoint import fsync_file, replace_dir
    from nemo_rl_fp16.guards import check_weights
    from nemo_rl_fp16.modeling.layout import ModelLayout
    from nemo_rl_fp16.policy.megatron.checkpointing import RECORD_KEY, describe_layout
    from nemo_rl_fp16.policy.megatron.convert import megatron_part_to_hf

    if "config" in model_cfg:
        hf_config = dict(model_cfg["config"])
    else:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model_cfg["name_or_path"]).to_dict()
    lay = ModelLayout.from_hf_config(hf_config)
    out = Path(out)
    tmp = out.parent / f".tmp_{out.name}_{os.getpid()}"
    started = _single_process_group()
    try:
        saved = dist_checkpointing.load_common_state_dict(str(directory))[RECORD_KEY]
        want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(lay).items()}
        diff = sorted(k for k in want if saved["model"].get(k) != want[k])
        if diff:
            raise ValueError(f"{directory} ({describe_layout(saved)}) holds another model than model: describes ("
                             + ", ".join(f"{k}: {saved['model'].get(k)} vs {want[k]}" for k in diff[:4])
                             + "); pass the run's model: block")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = _ShardWriter(tmp, max_shard_bytes)
        for layer, part in _model_parts(str(directory), lay.num_layers):
            if layer is None:  # the same names and tensors megatron_to_hf gives
                hf = {"model.embed_tokens.weight": part["embedding.word_embeddings.weight"],
                      "model.norm.weight": part["decoder.final_layernorm.weight"],
                      "lm_head.weight": part["embedding.word_embeddings.weight" if lay.tie_word_embeddings
                                             else "output_layer.weight"]}
            else:
                hf = megatron_part_to_hf(part, lay, layer, fused_experts=fused_experts)
            check_weights(hf, "HF export", None)
            writer.add(hf)
            del part, hf
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True, default=str))
        for f in tmp.iterdir():
            fsync_file(f)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return out
