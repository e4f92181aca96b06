"""Character-level tokenizer for the synthetic sanity tasks.

A real BPE tokenizer would need the hub (or a training run); the sanity tasks only need a dozen
symbols, and one token per character keeps sequences short and the tiny model cheap. The result
is a genuine `PreTrainedTokenizerFast`, so the trainer, the rollout engines and
`AutoTokenizer.from_pretrained` treat it exactly like a downloaded tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
# digits, the operators the sanity tasks use, and a space
DEFAULT_ALPHABET = "0123456789+-*= "


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, plus pad/eos/bos/unk specials (ids 0-3).

    Encoding prepends `<bos>` (add_special_tokens=True, the default) so every prompt starts with
    the same anchor token regardless of left padding; unknown characters map to `<unk>`.
    Decoding concatenates characters without separators.

    Args:
        alphabet: the characters to encode, ids 4, 5, ... in first-seen order (duplicates
            dropped); default digits, `+-*=` and space.

    Returns:
        A `PreTrainedTokenizerFast` (WordLevel model) with left padding and
        `model_max_length=1024`; vocabulary size 4 + distinct characters.

    Raises:
        ValueError: `alphabet` is empty.
    """
    chars = list(dict.fromkeys(alphabet))  # de-duplicate, keep order
    if not chars:
        raise ValueError("build_char_tokenizer: alphabet is empty; pass the characters to encode")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=1024,
    )
