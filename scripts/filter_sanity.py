#!/usr/bin/env python
"""The paper's sanity filtering: keep the problems the initial model solves with non-zero probability.

    python scripts/filter_sanity.py --model /models/Qwen2.5-Math-1.5B --input data/deepscaler.jsonl \
        --output data/deepscaler_sanity.jsonl --num-samples 8 --max-new-tokens 8192 --template qwen_math

For every row of the input JSONL (DeepScaleR-style `prompt`/`answer` fields, names configurable),
the prompt is templated exactly as the RL run will template it (`data.template`), `--num-samples`
responses are sampled from the local HF checkpoint with the package's KV-cached torch rollout
engine (`--precision`, default fp32: the filter should not depend on the rounding under test),
each is scored with the run's reward (`math_verify` by default) and the row is kept when its
sampled accuracy is in (`--min-acc`, `--max-acc`] (default (0, 1]: solved at least once). Kept rows
are written unchanged, in input order, plus a `sanity_accuracy` field; a summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF checkpoint folder (with its tokenizer)")
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", required=True, help="output JSONL (kept rows)")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--answer-key", default="answer")
    p.add_argument("--template", default="qwen_math", help="prompt template name or '{prompt}' string")
    p.add_argument("--reward", default="math_verify", help="exact_match | math_verify")
    p.add_argument("--num-samples", type=int, default=8, help="K samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--min-acc", type=float, default=0.0, help="keep rows with accuracy > this")
    p.add_argument("--max-acc", type=float, default=1.0, help="... and <= this (e.g. 0.99 drops solved ones)")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 engine")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from nemo_rl_fp16.data import DataError, get_reward, load_jsonl
    from nemo_rl_fp16.interfaces import SamplingParams
    from nemo_rl_fp16.precision import PrecisionPolicy
    from nemo_rl_fp16.rollout import TorchRolloutEngine

    if not Path(ns.model).is_dir():
        print(f"error: --model {ns.model} is not a local HF checkpoint folder", file=sys.stderr)
        return 2
    try:
        problems = load_jsonl(ns.input, ns.prompt_key, ns.answer_key, ns.template)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    rows = [line for line in Path(ns.input).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == len(problems)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if ns.device == "auto" else ns.device
    tok = AutoTokenizer.from_pretrained(ns.model, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    engine = TorchRolloutEngine({"name_or_path": ns.model}, PrecisionPolicy.from_name(ns.precision),
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, device=device,
                                seed=ns.seed)
    reward = get_reward(ns.reward)
    k = ns.num_samples
    acc: list[float] = []
    for start in range(0, len(problems), ns.batch_prompts):
        part = problems[start:start + ns.batch_prompts]
        ids = [tok(p.prompt)["input_ids"] for p in part]
        out = engine.generate(ids, SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                                                  num_generations=k, seed=ns.seed + start))
        resp = out.responses.masked_fill(out.response_mask == 0, tok.pad_token_id).tolist()
        texts = [tok.decode(r, skip_special_tokens=True) for r in resp]
        for i, p in enumerate(part):
            acc.append(sum(reward(t, p.answer) > 0 for t in texts[i * k:(i + 1) * k]) / k)
    kept = [(row, a) for row, a in zip(rows, acc, strict=True) if ns.min_acc < a <= ns.max_acc]
    Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
    with open(ns.output, "w", encoding="utf-8") as f:
        for row, a in kept:
            f.write(json.dumps({**json.loads(row), "sanity_accuracy": a}) + "\n")
    print(f"kept {len(kept)}/{len(rows)} problems with accuracy in ({ns.min_acc}, {ns.max_acc}] over {k} samples "
          f"-> {ns.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
