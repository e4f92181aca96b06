"""The run's tokenizer: the model's (a local HF folder) or the project's char tokenizer."""

from __future__ import annotations

from pathlib import Path

from nemo_rl_fp16.config import ConfigError, RecipeConfig
from nemo_rl_fp16.data import build_char_tokenizer


def build_tokenizer(rc: RecipeConfig):
    """The model's tokenizer, or the project's char tokenizer for models built from a config.

    Reads `model.tokenizer` (else `model.name_or_path`) with `AutoTokenizer.from_pretrained`
    (local files only); a tokenizer without a pad token pads with its EOS token.

    Args:
        rc (RecipeConfig): the typed recipe.

    Returns:
        PreTrainedTokenizerBase: the tokenizer both engines and the reward decoding use.

    Raises:
        ConfigError: the tokenizer / model path does not exist (no hub downloads).
    """
    source = rc.model.tokenizer or rc.model.name_or_path
    if source is None:
        return build_char_tokenizer()
    if not Path(source).exists():
        raise ConfigError(
            f"tokenizer/model path '{source}' does not exist; this package loads local HF folders only "
            f"(download the model first, then set model.name_or_path=/path/to/it)"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=rc.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
