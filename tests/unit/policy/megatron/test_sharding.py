"""Megatron weight sharding: TP shard/merge round trip, EP local-expert renumbering (pure functions)."""

from __future__ import annotations

import pytest
import torch
from test_convert import DENSE, MOE, _hf

from nemo_rl_fp16.modeling.layout import ModelLayout
from nemo_rl_fp16.policy.megatron.convert import hf_to_megatron
from nemo_rl_fp16.policy.megatron.sharding import ep_global_name, ep_local_experts, tp_merge, tp_shard


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shard_merge_round_trip(tp):
    lay = ModelLayout.from_hf_config({**DENSE, "num_key_value_heads": 4})
    full = hf_to_megatron(_hf({**DENSE, "num_key_value_heads": 4}).state_dict(), lay)
    for name, t in full.items():
        shards = [tp_shard(name, t, r, tp) for r in range(tp)]
        assert torch.equal(tp_merge(name, shards), t), name
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
    s0 = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 0, tp)
    gate, up = fc1.chunk(2)  # each rank holds its slice of gate AND of up
    assert torch.equal(s0, torch.cat([gate[: 128 // tp], up[: 128 // tp]]))
    assert tp_shard("decoder.layers.0.input_layernorm.weight", full["decoder.layers.0.input_layernorm.weight"], 1,
                    tp) is full["decoder.layers.0.input_layernorm.weight"]


def test_ep_local_experts_renumbers():
    lay = ModelLayout.from_hf_config(MOE)
    full = hf_to_megatron(_hf(MOE).state_dict(), lay)
    r1 = ep_local_experts(full, 1, 2, 4)
    name = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"
    assert torch.equal(r1[name], full[name.replace("experts.0.", "experts.2.")])
    assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in r1
    assert ep_global_name(name, 1, 2, 4).endswith("local_experts.2.linear_fc1.weight")
    with pytest.raises(ValueError, match="EP=3"):
        ep_local_experts(full, 0, 3, 4)
