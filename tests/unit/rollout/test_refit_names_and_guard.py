"""Refit plumbing that needs no vLLM: fused MoE expert names -> checkpoint names (by views), and the
Ray refit's non-finite refusal before anything is sent."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.data import build_char_tokenizer
from nemo_rl_fp16.distributed.ray_refit import checked_stream
from nemo_rl_fp16.guards import NonFiniteError
from nemo_rl_fp16.hf_export import write_hf_checkpoint
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.rollout.refit import iter_buckets, views
from nemo_rl_fp16.rollout.vllm_refit import check_names, checkpoint_meta, checkpoint_named

MOE = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False, norm_topk_prob=True)
DENSE = dict(model_type="qwen2", vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def test_fused_experts_map_to_the_checkpoint_names_by_views(tmp_path):
    from safetensors.torch import load_file

    d = write_hf_checkpoint({"config": MOE}, tmp_path / "moe", build_char_tokenizer(), seed=0)
    on_disk = load_file(str(d / "model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in on_disk.items()}
    fused = build_model({"config": MOE}, torch.float32, seed=0).state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)  # transformers >= 5 in memory
    assert not any(k.endswith("mlp.experts.gate_up_proj") for k in shapes)  # per-expert on disk
    with pytest.raises(ValueError, match="unknown names"):
        check_names(fused, shapes)  # what an in-place MoE refit met before the mapping
    mapped = dict(checkpoint_named(fused.items(), shapes))
    check_names(mapped, shapes)
    assert all(torch.equal(mapped[k], on_disk[k]) for k in shapes)  # the same values the checkpoint holds
    gu = fused["model.layers.0.mlp.experts.gate_up_proj"]
    up = mapped["model.layers.0.mlp.experts.3.up_proj.weight"]
    assert up.untyped_storage().data_ptr() == gu.untyped_storage().data_ptr()  # a view: no copy


def test_pushed_bucket_metadata_maps_fused_experts_and_drops_tied_names(tmp_path):
    """A bucket pushed by a trainer rank is re-described (checkpoint names, tied head dropped) over the same bytes."""
    from safetensors.torch import load_file

    d = write_hf_checkpoint({"config": MOE}, tmp_path / "moe", build_char_tokenizer(), seed=0)
    on_disk = load_file(str(d / "model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in on_disk.items()}
    fused = build_model({"config": MOE}, torch.float32, seed=0).state_dict()
    got = {}
    for b in iter_buckets(fused.items(), torch.float16, 3000):
        m = checkpoint_meta(b.meta, shapes, {"lm_head.weight"})
        assert m.nbytes == b.meta.nbytes
        got.update((k, v.clone()) for k, v in views(m, b.buffer))
    assert set(got) == set(shapes) - {"lm_head.weight"}
    assert all(torch.equal(got[k], on_disk[k].half()) for k in got)


def test_ray_refit_refuses_a_non_finite_weight_before_sending():
    pol = TorchPolicy({"config": DENSE}, PrecisionPolicy.from_name("fp16"), lr=1e-3)
    assert sum(1 for _ in checked_stream(pol, 3, torch.float16)) == len(pol.rollout_state_dict())
    with torch.no_grad():
        pol.master.model.layers[1].mlp.down_proj.weight[0, 0] = 7e4  # beyond fp16: inf in the engine
    with pytest.raises(NonFiniteError, match=r"refit refused at step 3: 1 weight .*layers\.1\.mlp\.down_proj"):
        checked_stream(pol, 3, torch.float16)
    assert sum(1 for _ in checked_stream(pol, 3, torch.float32)) > 0  # an fp32 engine can hold it
