"""The char tokenizer behaves like a downloaded HF tokenizer (save / AutoTokenizer round trip)."""

from transformers import AutoTokenizer

from nemo_rl_fp16.data.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer


def test_specials_and_encoding():
    tok = build_char_tokenizer()
    assert len(tok) == 4 + len(DEFAULT_ALPHABET)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    ids = tok("37+45=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == "37+45="
    assert tok("82", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "82"]
    assert tok("a", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_save_and_autotokenizer_round_trip(tmp_path):
    tok = build_char_tokenizer("0123456789+=")
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == tok.get_vocab()
    for text in ["12+34=", "9", "0+0="]:
        assert back(text)["input_ids"] == tok(text)["input_ids"]
        assert back.decode(back(text)["input_ids"], skip_special_tokens=True) == text
    assert (back.pad_token, back.eos_token, back.bos_token) == ("<pad>", "<eos>", "<bos>")
    batch = back(["1", "123"], padding=True)
    assert batch["input_ids"][0][:2] == [back.pad_token_id] * 2  # left padding for generation
