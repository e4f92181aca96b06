"""Refit time and peak extra host memory vs model size: streamed buckets vs the old one-shot path.

Each configuration runs in a fresh process: it builds an fp32 "trainer" state dict of N MiB and an
fp16 "engine" copy, then refits the engine (a) in buckets (`rollout.refit.iter_buckets` +
`load_bucket_into`, the direct transport; with `--shm` the shared-memory buckets of the
multiprocess path) or (b) one-shot as before issue 19 (whole state cast to fp16, turned into
`bytes`, rebuilt). Peak extra RSS = `ru_maxrss` after the refit - RSS before it.

    nice -n 19 python benchmarks/refit.py --sizes 32 128 512 --bucket-mb 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(size_mib: int, bucket_mib: float, mode: str) -> dict:
    import torch

    from nemo_rl_fp16.rollout.refit import iter_buckets, load_bucket_into, shm_alloc

    torch.manual_seed(0)
    n_layers = 8
    per = size_mib * 2**20 // 4 // n_layers
    side = int(per ** 0.5)
    src = {f"layers.{i}.w": torch.randn(side, side) for i in range(n_layers)}
    dst = {k: torch.empty(v.shape, dtype=torch.float16).fill_(0) for k, v in src.items()}  # resident before
    real_mib = sum(v.numel() * 4 for v in src.values()) / 2**20
    before = _rss_mib()
    t0 = time.perf_counter()
    if mode == "one-shot":
        wire = [(k, v.to(torch.float16).numpy().tobytes(), list(v.shape)) for k, v in src.items()]
        for k, data, shape in wire:
            dst[k].copy_(torch.frombuffer(bytearray(data), dtype=torch.float16).view(shape))
        del wire
    else:
        alloc = (lambda n, dev: shm_alloc(n, dev)) if mode == "shm" else None
        seen: set[str] = set()
        for b in iter_buckets(src.items(), torch.float16, int(bucket_mib * 2**20), alloc=alloc):
            load_bucket_into(dst, b.meta, b.buffer, seen)
            del b  # release before the generator allocates the next bucket
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"mode": mode, "model_fp32_mib": round(real_mib, 1), "rollout_fp16_mib": round(real_mib / 2, 1),
            "bucket_mib": bucket_mib, "refit_s": round(dt, 3), "peak_extra_rss_mib": round(peak - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512], help="fp32 model sizes, MiB")
    ap.add_argument("--bucket-mb", type=float, default=32.0)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(int(a.one[0]), float(a.one[1]), a.one[2])))
        return
    print("| mode | model fp32 MiB | fp16 MiB | bucket MiB | refit s | peak extra RSS MiB |")
    print("|---|---|---|---|---|---|")
    for size in a.sizes:
        for mode in ("bucketed", "shm", "one-shot"):
            out = subprocess.run([sys.executable, __file__, "--one", str(size), str(a.bucket_mb), mode],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {r['mode']} | {r['model_fp32_mib']} | {r['rollout_fp16_mib']} | {r['bucket_mib']} | "
                  f"{r['refit_s']} | {r['peak_extra_rss_mib']} |")


if __name__ == "__main__":
    main()
