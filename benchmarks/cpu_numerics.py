"""Benchmark: tiny Qwen2 forward and forward+backward in fp32 / bf16 / fp16, package and native kernels.

"package" is `nemo_rl_fp16.precision.cpu_numerics.cpu_numerics(cpu, dtype)` as the engines use it (the
prefill/training kernels: tile GEMM, FlashAttention-2 forward, fp64-evaluated transcendentals);
"native" is torch's own CPU kernels (`NEMO_RL_CPU_KERNELS=native`, with the fp32-GEMM speed
path where the host lacks fast low-precision GEMMs). Batch 128 x 24 tokens, hidden 128,
4 layers. Prints the median of `--repeats` runs and the |logit| differences against fp32 in ulps
of the respective low precision.

    python benchmarks/cpu_numerics.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.precision.cpu_numerics import KERNELS_ENV, cpu_has_native, cpu_isa, cpu_numerics

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
    def kernels(mode: str, dtype: torch.dtype):
        @contextlib.contextmanager
        def ctx():
            old = os.environ.get(KERNELS_ENV)
            os.environ[KERNELS_ENV] = mode
            try:
                with cpu_numerics("cpu", dtype):
                    yield
            finally:
                os.environ.pop(KERNELS_ENV) if old is None else os.environ.__setitem__(KERNELS_ENV, old)
        return ctx

    rows = [("fp32", torch.float32, contextlib.nullcontext)]
    rows += [(f"{n}-{mode}", dt, kernels(mode, dt)) for n, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))
             for mode in ("package", "native")]
    logits = {}
    print(f"tiny Qwen2 (hidden 128, 4 layers), batch {args.batch} x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, isa {cpu_isa()}, native fp16 {cpu_has_native(torch.float16)}, "
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
        nat, fst = logits[f"{low}-native"].float(), logits[f"{low}-package"].float()

        def err(x, y, ulp=ulp):
            return f"max {((x - y).abs().max() / ulp).item():.2f} / mean {((x - y).abs().mean() / ulp).item():.3f} ulp"
        print(f"logit differences in {low} ulps at the logits' scale (fp32 = fp32 model, fp32 weights):")
        print(f"  {low}-package vs {low}-native: {err(nat, fst)}")
        print(f"  {low}-native vs fp32:         {err(nat, ref)}")
        print(f"  {low}-package vs fp32:        {err(fst, ref)}")


if __name__ == "__main__":
    main()
