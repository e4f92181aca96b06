"""`back_off_grad_scalers`: megatron's `DynamicGradScaler`s follow `DynamicLossScaler.back_off_below`.

megatron-core builds its scaler's tensors on CUDA, so the scalers here are made on the CPU with the
same attributes; the optimizer build and the CUDA step run in tests/gpu/test_megatron_gpu.py.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler  # noqa: E402

from nemo_rl_fp16.policy.megatron.optimizer import back_off_grad_scalers  # noqa: E402
from nemo_rl_fp16.precision import DynamicLossScaler  # noqa: E402


def _dynamic(scale, min_scale=1.0, backoff=0.5, hysteresis=2):
    gs = DynamicGradScaler.__new__(DynamicGradScaler)  # __init__ puts its tensors on CUDA
    gs._scale = torch.tensor([float(scale)])
    gs.min_scale = torch.tensor([float(min_scale)])
    gs.backoff_factor = torch.tensor([float(backoff)])
    gs.hysteresis = hysteresis
    gs._hysteresis_tracker = hysteresis
    return gs


def test_backs_off_below_the_used_scale_like_the_cpu_scaler():
    gs = _dynamic(1024.0)
    assert back_off_grad_scalers(SimpleNamespace(grad_scaler=gs), 1024.0)
    ref = DynamicLossScaler(initial_scale=1024.0, min_scale=1.0, backoff_factor=0.5)
    assert ref.back_off_below(1024.0)
    assert float(gs.scale) == ref.scale == 512.0 and gs._hysteresis_tracker == 0
    # a scaler already below the used scale (megatron backed off on the overflow itself) is left as it is
    assert back_off_grad_scalers(SimpleNamespace(grad_scaler=gs), 1024.0) and float(gs.scale) == 512.0


def test_every_part_of_a_chained_optimizer_and_the_floor():
    a, b = _dynamic(64.0), _dynamic(64.0)
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(grad_scaler=a), SimpleNamespace(grad_scaler=b),
                                                  SimpleNamespace(grad_scaler=None)])
    assert back_off_grad_scalers(chained, 64.0) and float(a.scale) == float(b.scale) == 32.0
    floor = _dynamic(1.0, min_scale=1.0)
    assert not back_off_grad_scalers(SimpleNamespace(grad_scaler=floor), 1.0)  # cannot go lower: no retry
    assert float(floor.scale) == 1.0


def test_no_dynamic_scaler_means_no_retry():
    assert not back_off_grad_scalers(SimpleNamespace(grad_scaler=None), 1.0)  # bf16 / fp32
    const = ConstantGradScaler.__new__(ConstantGradScaler)
    const._scale = torch.tensor([1.0])
    assert not back_off_grad_scalers(SimpleNamespace(grad_scaler=const), 1.0)  # fp16 with scaling disabled
