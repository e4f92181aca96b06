"""Trainer side of the refit: what each Megatron rank materialises (TP=2 dense, EP=2 MoE, PP=2 dense untied
and tied; 2 processes, gloo).

Each rank measures its own peak resident memory (Linux `VmHWM`, reset through
`/proc/self/clear_refs`; glibc's mmap threshold is lowered so freed blocks go back to the OS and
reuse cannot hide an allocation) while the refit stream (`MegatronPolicy.rollout_stream`, packed
into fp16 buckets by `rollout.refit.iter_buckets`, each bucket hashed by a stand-in consumer) runs,
and asserts the issue-19 bound: the sending rank holds one piece (one decoder layer or the
embeddings) of the full model in fp32 plus one bucket — not the model; the other rank only sends
its shards. With PP=2 each stage sends its own layers (`refit_stream.stream_hf_weights_pp`): rank 1
(the last stage) gathers nothing and sends one piece at a time to rank 0, so it holds about one
piece, never its stage. The old all-gather (`rollout_state_dict`) is measured the same way and must
exceed the model size on both ranks, so the test can tell the two apart. The streamed weights must
equal `rollout_state_dict()` bitwise, and with PP=2 also the HF weights the policy started from
(what the PP=1 refit gives).

The worker is this file run as a script under torchrun (like `test_megatron_parallel.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "unit" / "policy"  # conftest.py: free_port, cpu_redirects (pytest fixtures do not reach torchrun)
MIB = 2**20


def test_refit_stream_memory_tp2_and_ep2(tmp_path):
    pytest.importorskip("megatron.core")
    sys.path.insert(0, str(HERE))
    from conftest import torchrun

    out = torchrun(Path(__file__), timeout=600, MALLOC_MMAP_THRESHOLD_="65536")
    for tag in ("TP2", "EP2", "PP2", "PP2tied"):
        for check in ("stream bound OK", "stream bitwise OK"):
            assert f"rank0 {tag} {check}" in out and f"rank1 {tag} {check}" in out, out[-4000:]
    print("\n".join(line for line in out.splitlines() if "stream_peak=" in line))  # the measured numbers (-s)


DENSE = {"config": {"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 512, "intermediate_size": 2048,
                    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "max_position_embeddings": 64, "tie_word_embeddings": False}}
MOE = {"config": {"model_type": "qwen3_moe", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
                  "moe_intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 64, "num_experts": 16, "num_experts_per_tok": 2,
                  "norm_topk_prob": True, "max_position_embeddings": 64, "tie_word_embeddings": False}}
BUCKET = 4 * MIB


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_extra_mib(fn) -> float:
    """Peak resident memory above the current one while `fn()` runs, in MiB."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def _pieces_mib(sd) -> tuple[float, float]:
    """(whole model, largest piece = one layer or the top-level tensors) in fp32 MiB, from HF names."""
    import re

    by: dict[str, int] = {}
    for k, v in sd.items():
        m = re.match(r"model\.layers\.(\d+)\.", k)
        by[m.group(1) if m else "top"] = by.get(m.group(1) if m else "top", 0) + v.numel() * 4
    return sum(by.values()) / MIB, max(by.values()) / MIB


def digest(t) -> str:
    import hashlib

    import torch

    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _refit(tr, streamed: dict) -> None:
    """The sender packs the stream into fp16 buckets; a stand-in consumer hashes each weight, keeps nothing."""
    import torch

    from nemo_rl_fp16.rollout.refit import iter_buckets

    for bucket in iter_buckets(tr.rollout_stream(0), torch.float16, BUCKET):
        for name, view in bucket.tensors():
            streamed[name] = digest(view)
        del bucket


def _worker() -> None:  # pragma: no cover - runs under torchrun
    sys.path.insert(0, str(HERE))
    import functools
    import gc

    import torch
    import torch.distributed as dist
    sys.path.insert(0, str(HERE))
    from conftest import cpu_redirects
    from megatron.core import parallel_state

    from nemo_rl_fp16.modeling import build_model
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.precision import PrecisionPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    with cpu_redirects():
        tied = {"config": {**DENSE["config"], "tie_word_embeddings": True}}
        for tag, cfg, par in (("TP2", DENSE, {"tensor_parallel_size": 2}), ("EP2", MOE, {"expert_parallel_size": 2}),
                              ("PP2", DENSE, {"pipeline_parallel_size": 2}),
                              ("PP2tied", tied, {"pipeline_parallel_size": 2})):
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            hf = build_model(cfg, torch.float32, seed=0)
            sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
            del hf
            model_mib, piece_mib = _pieces_mib(sd)
            start = {k: digest(v.to(torch.float16)) for k, v in sd.items()}  # = the PP=1 refit of these weights
            tr = MegatronPolicy(cfg, PrecisionPolicy.from_name("fp16"), lr=1e-3, micro_batch_size=2,
                                initial_state_dict=sd, **par)
            del sd
            gc.collect()
            streamed: dict[str, str] = {}
            stream_peak = _peak_extra_mib(functools.partial(_refit, tr, streamed))
            old_peak = _peak_extra_mib(tr.rollout_state_dict)
            print(f"rank{rank} {tag} model={model_mib:.1f} MiB piece={piece_mib:.1f} MiB bucket={BUCKET / MIB:.0f} MiB "
                  f"stream_peak={stream_peak:.1f} MiB all_gather_peak={old_peak:.1f} MiB", flush=True)
            assert old_peak > model_mib, (tag, old_peak, model_mib)  # the measurement sees a whole-model copy
            if rank == 0:
                bound = 2 * piece_mib + 1.5 * BUCKET / MIB + 8
                assert stream_peak <= bound, (tag, stream_peak, bound)
                assert stream_peak < model_mib / 2, (tag, stream_peak, model_mib)
            elif tag.startswith("PP"):
                assert streamed == {}  # only the sending rank receives
                assert stream_peak <= 2 * piece_mib + 8, (tag, stream_peak, piece_mib)  # one piece of its stage
            else:
                assert streamed == {}  # only the sending rank receives
                assert stream_peak <= 8, (tag, stream_peak)  # it sends its shards, materialises nothing
            print(f"rank{rank} {tag} stream bound OK", flush=True)
            want = {k: digest(v.to(torch.float16)) for k, v in tr.rollout_state_dict().items()}
            assert rank != 0 or streamed == want, (tag, set(streamed) ^ set(want))
            assert rank != 0 or not tag.startswith("PP") or streamed == start, tag  # the PP=1 weights
            print(f"rank{rank} {tag} stream bitwise OK", flush=True)
            del tr
            gc.collect()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
