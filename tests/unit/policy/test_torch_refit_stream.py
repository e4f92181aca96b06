"""`TorchPolicy.rollout_stream` single-process: the same tensors as `rollout_state_dict`, bitwise, name for name.

LoRA: the merged weights come one at a time (`W + scaling * B @ A` as each target's weight comes).
FSDP2 (2 ranks, gloo) is `tests/integration/test_fsdp_refit_memory.py`.
"""

import pytest
import torch

from nemo_rl_fp16.policy.torch_policy import TorchPolicy
from nemo_rl_fp16.policy.torch_refit_stream import LazyItems, stream_merged_lora
from nemo_rl_fp16.precision import PrecisionPolicy

CFG = {"config": {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
                  "max_position_embeddings": 32, "tie_word_embeddings": False}}
LORA = {"enabled": True, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _same(stream, full: dict) -> None:
    got = list(stream)
    assert [k for k, _ in got] == list(full)  # same names, same order
    for k, v in got:
        assert v.dtype == full[k].dtype == torch.float32 and torch.equal(v, full[k]), k


@pytest.mark.parametrize("tied", [False, True])
def test_plain_stream_equals_state_dict(tied):
    cfg = {"config": {**CFG["config"], "tie_word_embeddings": tied}}
    tr = TorchPolicy(cfg, PrecisionPolicy.from_name("fp16"), lr=1e-3)
    _same(tr.rollout_stream(0), tr.rollout_state_dict())


def test_lora_stream_merges_each_weight_as_it_comes():
    tr = TorchPolicy(CFG, PrecisionPolicy.from_name("fp16"), lr=1e-3, lora=LORA)
    with torch.no_grad():  # adapters with a non-zero delta (peft starts B at zero)
        for name, p in tr.master.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    full = tr.rollout_state_dict()
    _same(tr.rollout_stream(0), full)
    base = dict(tr.master.get_base_model().named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(full[q], base["model.layers.0.self_attn.q_proj.base_layer.weight"])  # really merged
    # one merged weight at a time: the previous one is gone once the next arrives
    import weakref

    refs = []
    for k, v in stream_merged_lora(tr.master):
        if (".q_proj." in k or ".v_proj." in k) and k.endswith(".weight"):
            refs.append(weakref.ref(v))
        del v
        assert sum(r() is not None for r in refs) <= 1, k
    assert len(refs) == 4


def test_lora_check_reads_the_merged_values():
    """The refit's non-finite check sees what is sent: a finite base + delta beyond fp16 is flagged."""
    from nemo_rl_fp16.guards import nonfinite_tensors

    tr = TorchPolicy(CFG, PrecisionPolicy.from_name("fp16"), lr=1e-3, lora=LORA)
    check = tr._fp32_named_params()
    assert isinstance(check, LazyItems) and nonfinite_tensors(check, 65504.0) == []
    with torch.no_grad():
        for name, p in tr.master.named_parameters():
            if "layers.1.self_attn.v_proj.lora_" in name:
                p.fill_(300.0)  # B @ A * scaling = 300 * 300 * 4 * 2 per entry: beyond fp16, each factor finite
    assert nonfinite_tensors(tr._fp32_named_params(), 65504.0) == ["model.layers.1.self_attn.v_proj.weight"]
