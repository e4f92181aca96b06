"""Benchmark: tiny Qwen2 forward and forward+backward in fp32 / bf16 / fp16, native and fast.

"fp16-fast" / "bf16-fast" are `nemo_rl_fp16.cpu_gemm.lowp_gemm_as_fp32(dtype)` as the engines use
it: fp16 / bf16 GEMMs run as fp32 GEMMs over the low-precision values with results rounded to the
low precision (same numerics, see the module doc); "fp16-fast+attn" also reroutes SDPA
(`attention=True`; not used by the engines). Batch 128 x 24 tokens, hidden 128, 4 layers, as in
shared/PLATFORM.md. Prints the median of `--repeats` runs and the |logit| differences of the fast
paths against native and against fp32, in ulps of the respective low precision.

    .venv/bin/python benchmarks/cpu_gemm.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch

from nemo_rl_fp16.cpu_gemm import cpu_has_native, lowp_gemm_as_fp32
from nemo_rl_fp16.models import build_model

CFG = {"config": {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 128, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=24)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    fast = functools.partial(lowp_gemm_as_fp32, torch.float16)
    rows = [("fp32", torch.float32, contextlib.nullcontext),
            ("bf16-native", torch.bfloat16, contextlib.nullcontext),
            ("bf16-fast", torch.bfloat16, functools.partial(lowp_gemm_as_fp32, torch.bfloat16)),
            ("fp16-native", torch.float16, contextlib.nullcontext), ("fp16-fast", torch.float16, fast),
            ("fp16-fast+attn", torch.float16, functools.partial(fast, attention=True))]
    logits = {}
    print(f"tiny Qwen2 (hidden 128, 4 layers), batch {args.batch} x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native fp16 {cpu_has_native(torch.float16)}, "
          f"native bf16 {cpu_has_native(torch.bfloat16)}")
    print(f"{'dtype':<15} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for name, dtype, ctx in rows:
        model = build_model(CFG, dtype, seed=0)

        def fwd(model=model, ctx=ctx):
            with torch.no_grad(), ctx():
                return model(input_ids=ids, attention_mask=mask).logits

        def fwd_bwd(model=model, ctx=ctx):
            model.zero_grad(set_to_none=True)
            with ctx():
                model(input_ids=ids, attention_mask=mask).logits.float().logsumexp(-1).mean().backward()

        logits[name] = fwd()
        print(f"{name:<15} {_time(fwd, args.repeats):11.1f} {_time(fwd_bwd, args.repeats):11.1f}", flush=True)
    ref = logits["fp32"].float()
    for low, mant in (("fp16", 10), ("bf16", 7)):
        ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().max())) - mant)  # ulp at the logits' scale
        nat, fst = logits[f"{low}-native"].float(), logits[f"{low}-fast"].float()

        def err(x, y, ulp=ulp):
            return f"max {((x - y).abs().max() / ulp).item():.2f} / mean {((x - y).abs().mean() / ulp).item():.3f} ulp"
        print(f"logit differences in {low} ulps at the logits' scale (fp32 = fp32 model, fp32 weights):")
        print(f"  {low}-fast vs {low}-native: {err(nat, fst)}")
        print(f"  {low}-native vs fp32:      {err(nat, ref)}")
        print(f"  {low}-fast vs fp32:        {err(fst, ref)}")


if __name__ == "__main__":
    main()
