"""Benchmark: token positions the trainer runs per real token, without trimming, trimmed, and packed.

For each length distribution it builds one RL step's `RolloutBatch` (prompts left-padded to the
widest, responses right-padded to the longest, `interfaces.RolloutBatch`), splits it over the
data-parallel ranks and runs the package's own micro-batching (`MicroBatchLoop`: its row split,
`trim.trim`, `packing.packed_slices` + `packing.compact`) through a counting `ModelAdapter` that
records the `[n, width]` of every scored micro-batch. Reported: positions run ÷ real tokens (prompt
+ response), one forward over the step's rows; the backward runs the same shapes.

Distributions:

- `demo`: the demo recipe `demo_tiny`: its problems (`sanity_add_steps`, seed of the recipe), the
  char tokenizer, 16 prompts x 8 samples, micro-batch 64. Responses are the reference answers +
  EOS (33-41 characters; the warm-started policy writes that format, accuracy 0.78-0.98 per the
  recipe): the demo is not run here, so sampled lengths are the answers' lengths.
- `longtail-<recipe>`: synthetic, long-tailed: prompts uniform 50-500 tokens, one per group of 8;
  responses lognormal (median 1200, sigma 1.0) clipped to the recipe's `rollout.max_new_tokens`
  (a spike of truncated rows at the cap, as in long-CoT RL); 64 prompts x 8 samples at the recipe's
  micro-batch size and data-parallel size.

Not counted: sequence parallelism pads each micro-batch's width to a multiple of TP (< TP columns
per row); packed micro-batches also run the lm_head on `p_i - min p` discarded prompt positions.

    python benchmarks/packing.py [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.policy.micro_batches import DataParallel, MicroBatchLoop

#: (name, micro_batch_size, data-parallel size, max_new_tokens) of the GPU recipes (recipes/*.yaml)
RECIPES = [
    ("dense_14b_fp16", 1, 2, 4096),
    ("moe_30b_a3b_fp16", 1, 8, 4096),
    ("octothinker_3b_fp16", 2, 8, 4096),
    ("grpo_fp16", 4, 8, 4096),
    ("qwen25_math_1p5b_fp16", 4, 8, 3072),
    ("r1_distill_1p5b_fp16", 4, 8, 8192),
]


class CountingAdapter:
    """`ModelAdapter` that records the shape of every micro-batch it is asked to score."""

    device = torch.device("cpu")

    def __init__(self, rank: int = 0, size: int = 1):
        self.dp = DataParallel(rank, size)
        self.positions = 0

    def score(self, mb: RolloutBatch, temperature: float) -> torch.Tensor:
        n, width = mb.input_ids.shape
        self.positions += n * width
        return torch.zeros(n, width - mb.prompt_width)

    def numerics(self):
        return contextlib.nullcontext()

    def data_parallel(self) -> DataParallel:
        return self.dp


def make_batch(prompt_lens: list[int], response_lens: list[int]) -> RolloutBatch:
    """A RolloutBatch with these real lengths in the package's layout (token ids irrelevant: 1)."""
    n, p, t = len(prompt_lens), max(prompt_lens), max(response_lens)
    pl, rl = torch.tensor(prompt_lens), torch.tensor(response_lens)
    attn = torch.cat([torch.arange(p)[None, :] >= p - pl[:, None], torch.arange(t)[None, :] < rl[:, None]], 1).long()
    resp = attn[:, p:].clone()
    return RolloutBatch(input_ids=attn.clone(), attention_mask=attn, response_mask=resp,
                        rollout_logp=torch.zeros(n, t), prompt_width=p, prompt_index=torch.arange(n))


def positions(batch: RolloutBatch, micro_batch_size: int, dp: int, mode: str) -> int:
    """Positions scored over every data-parallel rank's micro-batches in `mode` (none | trim | pack)."""
    total = 0
    for rank in range(dp):
        adapter = CountingAdapter(rank, dp)
        loop = MicroBatchLoop(adapter, micro_batch_size, trim=mode == "trim", packing=mode == "pack")
        for rows in loop.local_micro_batches(batch):
            loop._score(batch.select(rows), 1.0)  # the loop's own trim / compact path
        total += adapter.positions
    return total


def demo_lengths(seed: int) -> tuple[list[int], list[int], int, int]:
    """(prompt lengths, response lengths, micro-batch size, DP) of one `demo_tiny` step."""
    from nemo_rl_fp16.config import load_recipe, typed
    from nemo_rl_fp16.data import build_char_tokenizer
    from nemo_rl_fp16.data.datasets import get_dataset

    rc = typed(load_recipe("demo_tiny"))
    problems = get_dataset(rc.data.model_dump(), seed=rc.data.seed)
    tok = build_char_tokenizer()
    rng = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(problems), generator=rng)[: rc.data.prompts_per_step].tolist()
    g = rc.rollout.num_generations
    prompts = [len(tok(problems[i].prompt)["input_ids"]) for i in pick for _ in range(g)]
    responses = [min(len(tok(problems[i].answer, add_special_tokens=False)["input_ids"]) + 1,
                     rc.rollout.max_new_tokens) for i in pick for _ in range(g)]
    return prompts, responses, rc.policy.micro_batch_size, 1


def longtail_lengths(seed: int, max_new_tokens: int, prompts: int = 64, group: int = 8) -> tuple[list[int], list[int]]:
    """Prompts uniform 50-500 (one per group), responses lognormal(ln 1200, 1.0) clipped to [1, max_new_tokens]."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(50, 501, (prompts,), generator=g).repeat_interleave(group)
    r = torch.exp(torch.log(torch.tensor(1200.0)) + torch.randn(prompts * group, generator=g)).round()
    return p.tolist(), r.clamp(1, max_new_tokens).long().tolist()


def main() -> None:
    """Print positions run ÷ real tokens per distribution and mode (module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cases = []
    pl, rl, mbs, dp = demo_lengths(args.seed)
    cases.append(("demo (demo_tiny)", pl, rl, mbs, dp))
    for name, mbs, dp, max_new in RECIPES:
        pl, rl = longtail_lengths(args.seed, max_new)
        cases.append((f"longtail ({name})", pl, rl, mbs, dp))
    print(f"{'distribution':34s} {'rows':>5s} {'mbs':>4s} {'DP':>3s} {'real tok':>10s} "
          f"{'no trim':>8s} {'trim':>6s} {'packing':>8s}")
    for label, pl, rl, mbs, dp in cases:
        batch = make_batch(pl, rl)
        real = int(batch.attention_mask.sum())
        ratios = [positions(batch, mbs, dp, mode) / real for mode in ("none", "trim", "pack")]
        print(f"{label:34s} {len(pl):5d} {mbs:4d} {dp:3d} {real:10d} "
              f"{ratios[0]:8.3f} {ratios[1]:6.3f} {ratios[2]:8.3f}")


if __name__ == "__main__":
    main()
