"""The fp16 activation range monitor (`precision/range_monitor.py`): per-layer maxima, headroom, non-finite activations."""

from __future__ import annotations

import pytest
import torch

from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.precision.range_monitor import ActivationMonitor

CFG = {"config": {"model_type": "qwen2", "vocab_size": 48, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}}


def test_activation_monitor_records_layer_maxima_and_removes_hooks():
    model = build_model(CFG, torch.float16, seed=0)
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with ActivationMonitor(model) as mon:
            out = model(input_ids=ids, output_hidden_states=True)
        m = mon.metrics()
        model(input_ids=ids)  # hooks are gone: no further updates
    assert mon.metrics() == m
    assert m["range/act_absmax/layer0"] == out.hidden_states[1].abs().max().item()
    assert m["range/act_absmax"] == max(m["range/act_absmax/layer0"], m["range/act_absmax/layer1"])
    assert m["range/fp16_headroom"] == pytest.approx(65504.0 / m["range/act_absmax"])
    assert m["range/act_nonfinite"] == 0.0
    assert ActivationMonitor(model).metrics() == {}


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_activation_monitor_headroom_is_unsafe_on_nonfinite_activations(bad):
    """An fp16 overflow in a layer's output reads as headroom 0 ("unsafe"), never inf/NaN or a
    reassuring number from the finite layers."""
    model = build_model(CFG, torch.float16, seed=0)
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(0))

    def plant(_module, _inputs, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        h[0, 0, 0] = bad

    mon = ActivationMonitor(model)
    handle = mon.layers[1].register_forward_hook(plant)  # registered first: runs before the monitor's hook
    with torch.no_grad(), mon:
        model(input_ids=ids)
    handle.remove()
    m = mon.metrics()
    assert m["range/act_nonfinite"] >= 1 and m["range/act_absmax/layer0"] < 65504  # layer 0 looked fine
    assert m["range/fp16_headroom"] == 0.0


def test_all_reduce_keeps_nan_unseen_layers_and_counts(tmp_path):
    """`ActivationMonitor.all_reduce` on a one-rank gloo group: the values survive the round trip exactly
    (a NaN maximum stays NaN, a layer no forward reached stays unseen). The 2-rank MAX/SUM against the
    whole-batch probe: tests/integration/test_headroom_dp.py."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mon = ActivationMonitor(build_model({"config": {**CFG["config"], "num_hidden_layers": 3}}, torch.float16, seed=0))
        mon.max_abs = [torch.tensor(3.25), torch.tensor(float("nan")), None]
        mon.nonfinite = [torch.tensor(0), torch.tensor(5), None]
        before = mon.metrics()
        mon.all_reduce(None, "cpu")
        after = mon.metrics()
        assert mon.max_abs[2] is None and mon.nonfinite[2] is None
        assert after["range/act_absmax/layer0"] == 3.25 and after["range/act_absmax/layer1"] != after["range/act_absmax/layer1"]
        assert "range/act_absmax/layer2" not in after
        assert after["range/act_nonfinite"] == before["range/act_nonfinite"] == 5.0
        assert after["range/fp16_headroom"] == before["range/fp16_headroom"] == 0.0
    finally:
        if owned:
            dist.destroy_process_group()
