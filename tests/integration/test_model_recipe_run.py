"""A model recipe runs one RL step from a local HF checkpoint and JSONL data."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nemo_rl_fp16.cli import main
from nemo_rl_fp16.data import build_char_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny Qwen2 + the char tokenizer saved as an HF folder. Layers' outputs are zeroed and all
    embeddings equal, so the model always emits '7' (the filter's keep/drop is deterministic)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen2"
    tok = build_char_tokenizer()
    cfg = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("7")] = 1.0
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "math.jsonl"
    rows = [{"prompt": "3+4=", "answer": "7", "id": 0}, {"prompt": "2+2=", "answer": "4", "id": 1},
            {"prompt": "1+6=", "answer": "7", "id": 2}, {"prompt": "9-1=", "answer": "8", "id": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_model_recipe_runs_one_step_from_local_checkpoint(tiny_ckpt, tiny_jsonl, tmp_path):
    out = tmp_path / "run"
    rc = main(
        ["rl", "recipe=qwen25_math_1p5b_fp16",
         f"model.name_or_path={tiny_ckpt}", f"data.path={tiny_jsonl}", f"output_dir={out}", "device=cpu",
         "trainer.max_steps=1", "rollout.max_new_tokens=4", "rollout.num_generations=2", "data.prompts_per_step=2",
         "policy.micro_batch_size=4", "logging.tensorboard=false", "logging.progress=false",
         "trainer.headroom_every=0", "cluster.gpus_per_node=0", "rollout.backend=torch"])  # CPU: the torch sampler
    assert rc == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == 1
