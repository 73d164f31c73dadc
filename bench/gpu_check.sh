#!/usr/bin/env bash
# The GPU device check, one command on a machine with a CUDA GPU:
#
#   bash bench/gpu_check.sh [gpu_check.py options]      (about 5-8 minutes on an H200)
#
# 1. makes this checkout importable as `moemesh` without installing it, and installs the wheels in .whl/
#    (scripts/gpu_wheels.sh downloads them on a machine with a package index) for the GPU machine's Python;
# 2. runs the `gpu` tests (tests/*/test_cuda_*.py): the model families, the engine (with and without CUDA
#    graphs), sampling and the KV cache on CUDA, an expert-parallel replica with rank 0 on CUDA and its shard on
#    the CPU, and a mesh started with `moemesh up --device cuda`; and the
#    Triton kernels against their PyTorch references, compiled (tests/model/test_triton_kernels.py);
# 3. runs bench/gpu_check.py (python -m bench.gpu_check): the engine against transformers on a >= 2B
#    random Mixtral in bf16 at 1, 32 and 128 sequences, with the fraction of the memory-bandwidth limit a decode step reaches;
# and ends with one summary. Logs and gpu-check.json go to $OUT (default /tmp/moemesh-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh /tmp/moemesh-gpu-check
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"

timeout "${GPU_TESTS_TIMEOUT:-300}" "$PYTHON" -m pytest tests/unit/test_cuda_*.py tests/model/test_cuda_*.py \
  tests/model/test_triton_kernels.py tests/integration/test_cuda_*.py -q -rfEs -p no:cacheprovider \
  --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests_status=${PIPESTATUS[0]}
timeout "${GPU_BENCH_TIMEOUT:-360}" "$PYTHON" -m bench.gpu_check --out "$OUT" --tests-log "$OUT/gpu-tests.log" "$@" \
  2>&1 | tee "$OUT/gpu-bench.log"
bench_status=${PIPESTATUS[0]}
echo "gpu tests exit status $tests_status, benchmark exit status $bench_status; logs in $OUT"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
