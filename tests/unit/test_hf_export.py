"""HF export (`hf_export.py`): loadable folders swapped in atomically; a run's weights with the tokenizer's special ids."""

import pytest
import torch

from nemo_rl_fp16.hf_export import export_hf, write_hf_checkpoint


def test_export_hf_is_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from nemo_rl_fp16.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    out = export_hf(tmp_path / "hf", model, tok)
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".tmp_*"))
    back = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(out)("1+1=")["input_ids"] == tok("1+1=")["input_ids"]
    export_hf(tmp_path / "hf", model, tok)  # overwrite in place


MODEL = {"config": {"model_type": "qwen2", "vocab_size": 19, "hidden_size": 32, "intermediate_size": 32,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "max_position_embeddings": 32, "tie_word_embeddings": False}}


def test_write_hf_checkpoint_holds_the_given_weights_and_special_ids(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    from nemo_rl_fp16.data.tokenizer import build_char_tokenizer
    from nemo_rl_fp16.modeling import build_model

    tok = build_char_tokenizer()
    state = {k: torch.randn_like(v) for k, v in build_model(MODEL, torch.float32, seed=1).state_dict().items()}
    out = write_hf_checkpoint(MODEL, tmp_path / "hf", tok, state_dict=state, seed=0, step=7)
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(state) and all(saved[k].dtype == torch.float32 for k in saved)
    assert all(torch.equal(saved[k], state[k]) for k in state)  # the run's weights, not the seeded init
    back = AutoModelForCausalLM.from_pretrained(out)
    ids = (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    assert (back.config.pad_token_id, back.config.eos_token_id, back.config.bos_token_id) == ids
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.pad_token_id, gen.eos_token_id, gen.bos_token_id) == ids


def test_write_hf_checkpoint_without_state_is_the_seeded_init(tmp_path):
    from safetensors.torch import load_file

    from nemo_rl_fp16.data.tokenizer import build_char_tokenizer
    from nemo_rl_fp16.modeling import build_model

    tok = build_char_tokenizer()
    a = load_file(write_hf_checkpoint(MODEL, tmp_path / "a", tok, seed=3) / "model.safetensors")
    ref = build_model(MODEL, torch.float32, seed=3).state_dict()
    assert all(torch.equal(a[k], ref[k]) for k in ref)
    b = load_file(write_hf_checkpoint(MODEL, tmp_path / "b", tok, seed=4) / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_nonfinite_weights_write_nothing_and_keep_the_previous_export(tmp_path):
    from nemo_rl_fp16.data.tokenizer import build_char_tokenizer
    from nemo_rl_fp16.guards import NonFiniteError
    from nemo_rl_fp16.modeling import build_model

    tok = build_char_tokenizer()
    out = write_hf_checkpoint(MODEL, tmp_path / "hf", tok, seed=0)
    before = (out / "model.safetensors").read_bytes()
    model = build_model(MODEL, torch.float32, seed=0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"HF export refused at step 9: .*lm_head.weight"):
        export_hf(out, model, tok, step=9)
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="HF export refused"):
        write_hf_checkpoint(MODEL, out, tok, state_dict=bad, step=9)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp folder left
