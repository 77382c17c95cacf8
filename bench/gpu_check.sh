#!/usr/bin/env bash
# The device check: one prepared command for a lent GPU machine (H100/H200). Builds the CUDA
# parts, checks the GPU reduction kernels against a host reference for every dtype x op, measures
# the fused N-way reduce against a device-to-device copy, writes logs under $OUT and prints a
# short table last. Needs only cmake and nvcc (no MPI, no network).
#
#   bash bench/gpu_check.sh            # OUT defaults to build/gpu-check-out
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu-check-out}
mkdir -p "$OUT"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  nvcc --version | tail -2
  cmake -S . -B build/gpu-check -DPYCOMM_BUILD_PYTHON=OFF -DPYCOMM_CUDA=ON -DPYCOMM_BUILD_GPU_BENCH=ON \
    -DCMAKE_BUILD_TYPE=Release &&
    cmake --build build/gpu-check -j 8
} >"$OUT/build.log" 2>&1
status=$?
if [ $status -ne 0 ]; then
  tail -40 "$OUT/build.log"
  echo "gpu_check: build failed (log: $OUT/build.log)"
  exit $status
fi
head -3 "$OUT/build.log"

./build/gpu-check/reduce_bench >"$OUT/reduce_bench.txt" 2>&1
status=$?
grep -E "^FAIL" "$OUT/reduce_bench.txt" | head -20
echo
cat "$OUT/reduce_bench.txt" | grep -vE "^FAIL"
echo "gpu_check: reduce_bench exit $status (logs in $OUT)"
exit $status
