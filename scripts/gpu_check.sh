#!/usr/bin/env bash
# One prepared GPU check for the device machine (one H100/H200, Python 3.12, torch 2.11 CUDA, no
# megatron-core, no Transformer Engine, no apex). Runs, within ~8 minutes:
#   1. `pytest -m gpu tests/gpu/test_megatron_gpu.py`: fp16 and bf16 RL (GRPO) updates through
#      megatron's optimizer (Float16Module + DDP + get_megatron_optimizer, dynamic loss scale),
#      dense and MoE (4 experts top-2, non-grouped, fp32 router), a planted fp16 overflow, and
#      fp32 megatron log-probs vs the torch backend;
#   2. benchmarks/megatron_step.py: fp16 vs bf16 step time, tokens/s and model FLOP utilization of
#      a ~1B dense config (hidden 2048 x 16 layers, batch 4 x seq 2048), local-spec attention and
#      torch SDPA (flash) in the local spec;
#   3. `nemo-rl-fp16 mismatch recipe=mismatch_tiny` on CUDA: the rollout engine vs the trainer in
#      fp32/fp16/bf16 with the GPU's own kernels (report into $OUT/mismatch);
#   4. `nemo-rl-fp16 demo` on CUDA: the sanity RL task in fp16 and bf16 (report into $OUT/demo).
# Each section is independent and has its own timeout.
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

echo "=== megatron GPU tests"
timeout 180 "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_megatron_gpu.py 2>&1 | tee "$OUT/megatron_gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== megatron fp16 distributed checkpoint: save -> kill -> resume (issue 17)"
timeout 150 "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_megatron_dist_ckpt_gpu.py 2>&1 | tee "$OUT/megatron_dist_ckpt.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== megatron step benchmark"
timeout 240 "$PY" benchmarks/megatron_step.py --json "$OUT/megatron_bench.json" 2>&1 | tee "$OUT/megatron_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== refit: CUDA IPC transport, ~2 GB fp16 buckets to a stand-in consumer process (GB/s; issue 19)"
timeout 180 "$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_refit_cuda_ipc.py 2>&1 | tee "$OUT/refit_ipc.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== rollout-vs-trainer mismatch on CUDA (torch engines)"
timeout 60 "$PY" -m nemo_rl_fp16.cli mismatch recipe=mismatch_tiny device=cuda output_dir="$OUT/mismatch" 2>&1 \
    | tee "$OUT/mismatch.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== sanity demo on CUDA (fp16 vs bf16)"
timeout 120 "$PY" -m nemo_rl_fp16.cli demo device=cuda output_dir="$OUT/demo" 2>&1 | tee "$OUT/demo.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== summary"
grep -h -E "GPU-RESULT|BENCH|passed|failed|error" "$OUT/megatron_gpu_tests.log" "$OUT/megatron_dist_ckpt.log" "$OUT/megatron_bench.log" "$OUT/refit_ipc.log" || true
exit $status
