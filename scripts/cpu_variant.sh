#!/usr/bin/env bash
# Run a command as if on another CPU variant of this project's machines (docs/precision.md):
#   scripts/cpu_variant.sh avx2 nemo-rl-fp16 mismatch recipe=mismatch_tiny
#   scripts/cpu_variant.sh host python -m pytest -q tests/unit/precision/test_cpu_kernels.py tests/unit/precision/test_cpu_numerics.py
# avx2: caps MKL, oneDNN and ATen's kernels to AVX2 and overrides the package's own detection
# (torch's _is_avx512_bf16_supported() ignores the caps). host: removes every such setting.
set -euo pipefail
variant=${1:?usage: scripts/cpu_variant.sh avx2|host COMMAND [ARGS...]}
shift
[ $# -gt 0 ] || { echo "cpu_variant.sh: no command given" >&2; exit 2; }
case "$variant" in
  avx2) export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 NEMO_RL_CPU_ISA=avx2 ;;
  host) unset MKL_ENABLE_INSTRUCTIONS ONEDNN_MAX_CPU_ISA ATEN_CPU_CAPABILITY NEMO_RL_CPU_ISA ;;
  *) echo "cpu_variant.sh: unknown variant '$variant' (avx2 | host)" >&2; exit 2 ;;
esac
exec "$@"
