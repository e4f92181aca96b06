"""Paper model recipes (fp16 + bf16 twins), the sanity filter script, and one real RL step of a
model recipe from a locally built tiny HF checkpoint (no hub access)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nemo_rl_fp16.cli import main
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.data import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ["qwen25_math_1p5b", "r1_distill_1p5b", "octothinker_3b"]


@pytest.mark.parametrize("name", PAIRS)
def test_fp16_recipe_and_bf16_twin(name):
    fp16, bf16 = typed(load_recipe(f"{name}_fp16")), typed(load_recipe(f"{name}_bf16"))
    assert fp16.precision.name == "fp16" and bf16.precision.name == "bf16"
    assert fp16.model_dump(exclude={"precision", "recipe", "output_dir"}) == bf16.model_dump(
        exclude={"precision", "recipe", "output_dir"})
    assert fp16.reward.name == "math_verify" and fp16.data.dataset == "jsonl"
    assert fp16.policy.lr == 1e-6 and fp16.rollout.num_generations == 8
    assert fp16.model.name_or_path and fp16.model.config is None


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


def _filter_main():
    spec = importlib.util.spec_from_file_location("filter_sanity", ROOT / "scripts" / "filter_sanity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_filter_sanity_keeps_problems_solved_at_least_once(tiny_ckpt, tiny_jsonl, tmp_path):
    filter_main, out = _filter_main(), tmp_path / "kept.jsonl"
    args = ["--model", str(tiny_ckpt), "--input", str(tiny_jsonl), "--output", str(out), "--template", "plain",
            "--reward", "exact_match", "--num-samples", "4", "--max-new-tokens", "1", "--device", "cpu"]
    assert filter_main(args) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [0, 2] and all(r["sanity_accuracy"] == 1.0 for r in kept)
    assert kept[0] == {"prompt": "3+4=", "answer": "7", "id": 0, "sanity_accuracy": 1.0}
    assert filter_main([*args, "--max-acc", "0.99"]) == 0 and out.read_text() == ""  # drop always-solved ones
    assert filter_main([*args[:1], str(tmp_path / "missing"), *args[2:]]) == 2


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
