#!/usr/bin/env bash
# One prepared GPU check for the device machine (one H100/H200, Python 3.12, torch 2.11 CUDA, no
# megatron-core, no Transformer Engine, no apex). Runs, within ~8 minutes:
#   1. `pytest -m gpu tests/gpu/test_megatron_gpu.py`: fp16 and bf16 RL (GRPO) updates through
#      megatron's optimizer (Float16Module + DDP + get_megatron_optimizer, dynamic loss scale),
#      dense and MoE (4 experts top-2, non-grouped, fp32 router), a planted fp16 overflow, and
#      fp32 megatron log-probs vs the torch backend;
#   1b. tests/gpu/test_megatron_dist_ckpt_gpu.py: fp16 distributed checkpoint save -> kill -> resume;
#   1c. tests/gpu/test_megatron_rope_gpu.py: a rope-scaled (llama3) config's megatron logits vs HF
#      on CUDA, fp32 without TF32, local and SDPA attention, with an unscaled-rope control;
#   2. benchmarks/megatron_step.py: fp16 vs bf16 step time, tokens/s and model FLOP utilization of
#      a ~1B dense config (hidden 2048 x 16 layers, batch 4 x seq 2048), local-spec attention and
#      torch SDPA (flash) in the local spec; fp16 and bf16 timed in alternation, the ratio the
#      median of 5 back-to-back pairs in one call (GPU-RESULT line: the headline run sdpa+fused:4);
#   3. `nemo-rl-fp16 mismatch recipe=mismatch_tiny` on CUDA: the rollout engine vs the trainer in
#      fp32/fp16/bf16 with the GPU's own kernels (report into $OUT/mismatch);
#   4. `nemo-rl-fp16 demo` on CUDA: the sanity RL task in fp16 and bf16 (report into $OUT/demo).
# What one GPU cannot show (needs >= 2 GPUs, and the big recipes a multi-node cluster): sequence
# parallelism and any TP / EP > 1 on NCCL (NCCL refuses two ranks on one GPU), the NCCL broadcast
# refit between trainer rank 0 and an engine on another GPU, vLLM at TP > 1 (and vLLM at all: the
# device machine has no vllm), node placement. Those run on CPU only: `nemo-rl-fp16 rehearse`
# (docs/scaling.md), the gloo torchrun tests in tests/integration, the vLLM-CPU job (docs/vllm.md).
# Each section is independent and has its own timeout, capped by what is left of an 8-minute
# budget for the whole script (a section that would start with under 20 s left is skipped).
# One `GPU-RESULT` line per item (the summary at the end collects them).
#
# Before the run, here (repo root): megatron-core needs only torch, numpy, packaging (on the device
# machine); the package itself also needs omegaconf and pydantic, which the machine lacks (~5 MB):
#   echo /.whl/ >> .git/info/exclude
#   for p in megatron-core==0.19.2 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 pydantic==2.14.4 \
#            annotated-types typing-inspection; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --abi cp312 --platform manylinux_2_28_x86_64 -d .whl "$p"; done
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --abi cp312 --platform manylinux_2_17_x86_64 -d .whl pydantic-core==2.50.5
# Then run it with the device tool: command `bash scripts/gpu_check.sh`, carry [".whl"], timeout 590.
# Outputs (logs, bench JSON) go to $OUT when set (the device tool's return folder), else /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
status=0
BUDGET=480  # seconds for the whole script
# section timeout: the smaller of the section's own and what is left of the budget (0: skip the section)
cap() { local left=$((BUDGET - SECONDS)); [ "$left" -lt 20 ] && { echo 0; return; }; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
run_section() {  # run_section NAME TIMEOUT LOG CMD...: one section under its capped timeout, output into LOG
    local name=$1 t; t=$(cap "$2"); local log=$3; shift 3
    echo "=== $name"
    if [ "$t" -eq 0 ]; then echo "GPU-RESULT $name: skipped (8-minute budget spent)" | tee "$log"; status=1; return; fi
    timeout "$t" "$@" 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if ! "$PY" -c "import megatron.core, omegaconf, pydantic" 2>/dev/null; then
    if ! ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
        echo "megatron-core/omegaconf/pydantic missing and no .whl/ carried (see this script's header)"; exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package from this checkout (no install needed)
"$PY" -c "import megatron.core, nemo_rl_fp16.policy.megatron.attention as m; print('megatron-core', megatron.core.__version__, 'TE', m.te_available())" || exit 2

run_section "megatron GPU tests" 170 "$OUT/megatron_gpu_tests.log" \
    "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_megatron_gpu.py

run_section "megatron fp16 distributed checkpoint: save -> kill -> resume (issue 17)" 120 "$OUT/megatron_dist_ckpt.log" \
    "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_megatron_dist_ckpt_gpu.py

run_section "megatron rope-scaled logits vs HF on CUDA (issue 17)" 60 "$OUT/megatron_rope.log" \
    "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_megatron_rope_gpu.py

run_section "megatron step benchmark (fp16/bf16: median of 5 pairs, MFU)" 200 "$OUT/megatron_bench.log" \
    "$PY" benchmarks/megatron_step.py --pairs 5 --json "$OUT/megatron_bench.json"

run_section "refit: CUDA IPC transport, ~2 GB fp16 buckets to a stand-in consumer process (GB/s; issue 19; + the ipc sender loop, 16 MiB)" 90 \
    "$OUT/refit_ipc.log" "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_refit_cuda_ipc.py

run_section "rollout-vs-trainer mismatch on CUDA (torch engines)" 50 "$OUT/mismatch.log" \
    "$PY" -m nemo_rl_fp16.cli mismatch recipe=mismatch_tiny device=cuda output_dir="$OUT/mismatch"
tail -25 "$OUT/mismatch.log"

run_section "sanity demo on CUDA (fp16 vs bf16)" 100 "$OUT/demo.log" \
    "$PY" -m nemo_rl_fp16.cli demo device=cuda output_dir="$OUT/demo"
tail -25 "$OUT/demo.log"

echo "=== summary"
grep -h -E "GPU-RESULT|BENCH|passed|failed|error" "$OUT/megatron_gpu_tests.log" "$OUT/megatron_dist_ckpt.log" \
    "$OUT/megatron_rope.log" "$OUT/megatron_bench.log" "$OUT/refit_ipc.log" || true
echo "total ${SECONDS}s (budget ${BUDGET}s)"
exit $status
