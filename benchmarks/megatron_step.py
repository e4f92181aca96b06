"""Megatron RL train-step benchmark: fp16 vs bf16 step time, tokens/s and model FLOP utilization.

The real trainer path (`MegatronPolicy.train_step`: Float16Module + megatron DDP +
megatron Adam with dynamic loss scaling in fp16, fp32 log-softmax over the full vocabulary) on a
~1B dense config (Llama layout: hidden 2048 x 16 layers, 16 heads, SwiGLU 5632, vocab 32000),
micro-batch 4 x seq 2048, with the local spec's unfused attention (`--attention local`) and with
torch SDPA (flash) swapped into the local spec (`--attention sdpa`). With SDPA it also runs four
micro-batches per optimizer step (`sdpa:4`, 16 x 2048 tokens), as an RL step with a large global
batch does, so the fp32 optimizer update is amortised, and the same with megatron's compiled
SwiGLU / bias-dropout-add fusions (`sdpa+fused:4`). Run on the device machine by
scripts/gpu_check.sh; prints one `BENCH` line per (attention, accumulation, precision) and a JSON
summary.

Pairs: for each run the precisions' policies are built side by side and timed in alternation,
`--pairs` times (`--steps` steps each), so the fp16/bf16 ratio is the median of that many
back-to-back pairs in one call (clock and thermal drift hit both halves of a pair alike). The
step time reported per precision is its median over the pairs. The headline run (`--headline`,
default the last of `--runs`) also prints one `GPU-RESULT` line: the median ratio, every pair's
ratio, and both precisions' MFU.

Model FLOPs per step = tokens x (6 N + 6 L s h): N = parameters excluding the input embedding
(output layer included), the second term the causal attention score/context GEMMs (half of the
full 12 L s h). Utilization = that / step time / peak (989 TFLOP/s: H100/H200 SXM dense fp16/bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.precision import PrecisionPolicy

CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
          "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
          "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
PEAK = 989e12


def model_flops(cfg: dict, n_params: int, tokens: int, seq: int) -> float:
    n = n_params - cfg["vocab_size"] * cfg["hidden_size"]
    return tokens * (6 * n + 6 * cfg["num_hidden_layers"] * seq * cfg["hidden_size"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timing (one half of a pair)")
    ap.add_argument("--pairs", type=int, default=5, help="alternating fp16/bf16 timings per run (median reported)")
    ap.add_argument("--headline", default=None, help="the run spec of the GPU-RESULT line (default: the last run)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", nargs="+", default=["local:1", "sdpa:1", "sdpa:4", "sdpa+fused:4"],
                    help="ATTENTION[+fused]:MICRO_BATCHES_PER_STEP; +fused = megatron's compiled SwiGLU/bias-dropout")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="after each run, print torch.profiler's top CUDA kernels")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run (needs the test CUDA redirects)")
    ap.add_argument("--hidden", type=int, default=2048)
    a = ap.parse_args()
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy

    cfg = {**CONFIG, "num_hidden_layers": a.layers}
    if a.hidden != 2048:  # smoke runs: shrink everything
        cfg.update(hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_attention_heads=4, num_key_value_heads=4,
                   vocab_size=256)
    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model_cfg = {"config": cfg}
    hf = build_model(model_cfg, torch.float32, seed=0)
    n_params = sum(p.numel() for p in hf.parameters())
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    del hf
    g = torch.Generator().manual_seed(0)
    runs = []
    for spec in a.runs:
        attn, acc = spec.split(":")
        runs.append((attn.removesuffix("+fused"), attn.endswith("+fused"), int(acc)))
    n_rows = a.batch * max(acc for *_, acc in runs)
    ids = torch.randint(0, cfg["vocab_size"], (n_rows, a.seq), generator=g)
    p = 1
    full = RolloutBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                        response_mask=torch.ones(n_rows, a.seq - p, dtype=torch.long),
                        rollout_logp=torch.zeros(n_rows, a.seq - p), prompt_width=p,
                        prompt_index=torch.arange(n_rows))
    adv = torch.randn(n_rows, generator=g)

    def loss_fn(logp, rows):
        return -(logp * adv[rows, None].to(logp.device)).mean(), {}

    results, pair_ratios = [], {}
    for attn, fused, acc in runs:
        batch = full.select(slice(0, a.batch * acc))
        tokens = a.batch * acc * a.seq
        flops = model_flops(cfg, n_params, tokens, a.seq)
        policies = {name: MegatronPolicy(model_cfg, PrecisionPolicy.from_name(name), lr=1e-5, micro_batch_size=a.batch,
                                         device=a.device, seed=0, initial_state_dict=sd, attention=attn,
                                         fused_elementwise=fused) for name in a.precisions}
        for tr in policies.values():
            for _ in range(a.warmup):
                tr.train_step(batch, loss_fn, 1.0)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times: dict[str, list[float]] = {name: [] for name in a.precisions}
        last = {}
        for _ in range(max(1, a.pairs)):  # alternate the precisions: each pair is back to back
            for name, tr in policies.items():
                sync()
                t0 = time.perf_counter()
                res = [tr.train_step(batch, loss_fn, 1.0) for _ in range(a.steps)]
                sync()
                times[name].append((time.perf_counter() - t0) / a.steps)
                last[name] = (sum(x.skipped for x in res), res[-1].loss_scale)
        if "fp16" in times and "bf16" in times:
            pair_ratios[(attn, fused, acc)] = [f / b for f, b in zip(times["fp16"], times["bf16"], strict=True)]
        for name, tr in policies.items():
            dt = statistics.median(times[name])
            r = {"attention": attn, "fused": fused, "accum": acc, "tokens": tokens, "precision": name,
                 "step_ms": 1e3 * dt, "step_ms_all": [1e3 * t for t in times[name]], "tokens_per_s": tokens / dt,
                 "model_tflops": flops / dt / 1e12, "mfu": flops / dt / PEAK,
                 "skipped": last[name][0], "loss_scale": last[name][1],
                 "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, "params": n_params}
            results.append(r)
            if a.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
                    for _ in range(2):
                        tr.train_step(batch, loss_fn, 1.0)
                    sync()
                print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30,
                                                max_name_column_width=70), flush=True)
            print(f"BENCH attention={attn}{'+fused' * fused} accum={acc} {name}: step {r['step_ms']:.1f} ms (median of "
                  f"{len(times[name])}), {r['tokens_per_s']:.0f} tok/s, {r['model_tflops']:.0f} model TFLOP/s, "
                  f"MFU {100 * r['mfu']:.1f}%, skipped {r['skipped']}, loss_scale {r['loss_scale']:g}, "
                  f"peak {r['peak_mem_gib']:.1f} GiB (both precisions resident)", flush=True)
        del policies, tr
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    for attn, fused, acc in runs:
        ratios = pair_ratios.get((attn, fused, acc))
        if ratios:
            print(f"BENCH attention={attn}{'+fused' * fused} accum={acc} fp16/bf16 step time = "
                  f"{statistics.median(ratios):.3f} (median of {len(ratios)} pairs: "
                  f"{', '.join(f'{x:.3f}' for x in ratios)})", flush=True)
    head = a.headline or a.runs[-1]
    h_attn, h_acc = head.split(":")
    key = (h_attn.removesuffix("+fused"), h_attn.endswith("+fused"), int(h_acc))
    ratios = pair_ratios.get(key)
    mfu = {r["precision"]: r["mfu"] for r in results if (r["attention"], r["fused"], r["accum"]) == key}
    if ratios:
        print(f"GPU-RESULT megatron step {head} ({n_params / 1e9:.3f}B, {a.batch}x{a.seq} tokens per micro-batch): "
              f"fp16/bf16 step time {statistics.median(ratios):.3f} (median of {len(ratios)} pairs; "
              f"{', '.join(f'{x:.3f}' for x in ratios)}; target <= 1.03), fp16 MFU {100 * mfu['fp16']:.1f}% "
              f"(target >= 40%), bf16 MFU {100 * mfu['bf16']:.1f}%", flush=True)
    per_tok = model_flops(cfg, n_params, 1, a.seq)
    print(f"BENCH params {n_params / 1e9:.3f}B, {a.batch} x {a.seq} tokens per micro-batch, "
          f"{per_tok * a.batch * a.seq / 1e12:.1f} model TFLOP per micro-batch")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
