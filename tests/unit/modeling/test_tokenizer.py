"""`modeling/tokenizer.py`: the run's tokenizer (the char tokenizer for config-built models, a folder otherwise)."""

import pytest

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.data import build_char_tokenizer
from nemo_rl_fp16.modeling.tokenizer import build_tokenizer


def _rc(tmp_path, *over):
    return typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}/run", "warm_start.enabled=false",
                                             "logging.progress=false", "logging.tensorboard=false",
                                             "data.prompts_per_step=4", *over]))


def test_build_tokenizer_char_for_config_models_local_folder_otherwise(tmp_path):
    tok = build_tokenizer(_rc(tmp_path))
    assert tok.get_vocab() == build_char_tokenizer().get_vocab() and tok.decode([5, 6]) == "12"
    with pytest.raises(ConfigError, match=r"tokenizer/model path '.*nowhere' does not exist"):
        build_tokenizer(_rc(tmp_path, f"model.tokenizer={tmp_path}/nowhere"))
    saved = build_char_tokenizer()
    saved.pad_token = None  # a tokenizer without a pad token (most base models): padding uses EOS
    saved.save_pretrained(tmp_path / "tok")
    loaded = build_tokenizer(_rc(tmp_path, f"model.tokenizer={tmp_path}/tok"))
    assert loaded.pad_token_id == loaded.eos_token_id == saved.eos_token_id
