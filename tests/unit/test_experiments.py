"""The mismatch command honours explicit precision keys on both engines, or refuses them."""

import pytest
import torch

from nemo_rl_fp16.commands.mismatch import mismatch_policies
from nemo_rl_fp16.config import ConfigError, load_recipe, typed


def test_explicit_dtype_keys_reach_both_engines_of_every_precision():
    rc = typed(load_recipe("mismatch_tiny", ["precision.logits_dtype=float16", "mismatch.precisions=[fp16,bf16]"]))
    pols = mismatch_policies(rc)
    assert set(pols) == {"fp16", "bf16"}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        train, rollout = pols[name]
        assert train.param_dtype == rollout.param_dtype == dt
        assert train.logits_dtype == rollout.logits_dtype == torch.float16


@pytest.mark.parametrize("override", ["precision.param_dtype=float16", "precision.rollout=bf16"])
def test_keys_the_sweep_sets_are_refused(override):
    rc = typed(load_recipe("mismatch_tiny", [override, "precision.allow_mismatch=true"]))
    with pytest.raises(ConfigError, match="mismatch.precisions"):
        mismatch_policies(rc)
