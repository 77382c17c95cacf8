#!/usr/bin/env bash
# The device check: one prepared command for a lent GPU machine (H100/H200; no network there).
#   1. MPI: installs the mpich and mpi4py wheels carried in .whl/ (see bench/README.md) into /tmp/mpi;
#   2. builds the CUDA kernels, their benchmark and the Python module (in place, into pycomm/);
#   3. checks the GPU reduction kernels against a host reference and measures them against a
#      device-to-device copy (bench/gpu/reduce_bench.cu);
#   4-5. runs the GPU allreduce benchmark at P = 2 and 4 (bench/gpu_allreduce.py), host sync, at
#      P = 2 with stream sync and with split work, and at P = 2 on two simulated nodes (the path
#      every rank takes without CUDA IPC, too);
#   6. runs the GPU tests (tests/test_gpu*.py): torch, cupy and DLPack-only arrays at P = 1, 2, 4
#      (and 9) ranks sharing the GPU, split work forced at P = 2 and 4, 4 ranks on simulated nodes
#      (leaders, or split, every slice's owners, combine through pinned host memory), without
#      CUDA IPC, and the benchmark CLI on torch bfloat16 (step 8 runs it on cupy float32); the
#      kernels' own test is step 3's;
#   7. trains with cupy arrays (python -m pycomm.train --device gpu --check) where scikit-learn exists;
#   8. runs the benchmark CLI on GPU arrays (python -m pycomm.bench --device gpu --vs mpi) at P = 2:
#      the allreduce sweep, then allgather and reduce_scatter in place, short.
# GPU_CHECK_QUICK=1 runs steps 1, 2 and the 8 B-64 KiB part of step 4 at P = 2, host sync, only
# (a minute or two after the build), to try a change to the small-message path on a device.
# Logs and JSON go to $OUT (default build/gpu-check-out): 7 files, under the device tool's 8 (the
# JSON parts wait in /tmp until the end, so a run cut short leaves no more); a short summary is
# printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
summary=()
step() { summary+=("$(printf '%-34s %s' "$1" "$2")"); }
# Everything ends within GPU_CHECK_BUDGET seconds (default 480, for a call with timeout_s=540: a
# step that starts with its time spent still gets 5 s and a 10 s grace to be killed), so a hang
# in one step still leaves the logs of the others and the summary: each step gets at most its own
# limit and what is left.
SECONDS=0
GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-480}
[[ $GPU_CHECK_BUDGET =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_BUDGET must be whole seconds"; exit 2; }
limit() { local left=$((GPU_CHECK_BUDGET - SECONDS)); echo $((left < $1 ? (left > 5 ? left : 5) : $1)); }
# SIGINT first (pytest and the launcher then kill the ranks they started and print their output),
# SIGKILL 10 s later.
timed() { local seconds=$1; shift; timeout -s INT -k 10 "$seconds" "$@"; }

PARTS=$(mktemp -d /tmp/gpu-check-parts.XXXXXX)  # each run's JSON, merged into $OUT at the end

# 1. MPI
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --prefix /tmp/mpi .whl/*.whl >"$PARTS/setup.log" 2>&1
  site=$(ls -d /tmp/mpi/lib/python3*/site-packages 2>/dev/null | head -1)
  export PATH=/tmp/mpi/bin:$PATH LD_LIBRARY_PATH=/tmp/mpi/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$site:${PYTHONPATH:-}
fi
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  $PY -c "import mpi4py.MPI as M, torch, cupy; print(M.Get_library_version().splitlines()[0], torch.__version__, cupy.__version__)"
  which mpirun
  cat "$PARTS/setup.log" 2>/dev/null
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 2. Build
cmake -S . -B build/gpu-check -DCMAKE_BUILD_TYPE=Release -DPYCOMM_BUILD_PYTHON=ON -DPYCOMM_CUDA=ON -DPYCOMM_BUILD_GPU_BENCH=ON \
  -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >"$OUT/build.log" 2>&1 &&
  timed "$(limit 300)" cmake --build build/gpu-check -j 16 >>"$OUT/build.log" 2>&1 &&
  cp build/gpu-check/_core*.so pycomm/
status=$?
# Which libstdc++ the module uses: std::locale or istream code defined in it means libstdc++ was
# linked in statically (suspected in the crash of bench/results/2026-11-27-h200-gpu-recheck.md).
[ $status -eq 0 ] && {
  grep -m1 "^CMAKE_CXX_COMPILER:" build/gpu-check/CMakeCache.txt
  ldd pycomm/_core*.so | grep -E "stdc|gcc_s"
  echo "libstdc++ code in the module: $(nm -D --defined-only pycomm/_core*.so | grep -cE '_ZNSt6locale|_ZNSi10_M_extract') symbols"
} >>"$OUT/machine.txt" 2>&1
step "build (CUDA, module)" "$([ $status -eq 0 ] && echo ok || echo FAILED)"
if [ $status -ne 0 ]; then
  tail -30 "$OUT/build.log"
  printf '%s\n' "${summary[@]}"
  rm -rf "$PARTS"
  exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONFAULTHANDLER=1  # a crash prints the Python stack of each thread

# One JSON for all runs (the device tool brings back few files), keyed by each part's name.
merge_parts() {
  $PY - "$PARTS" "$OUT" <<'PYEOF'
import glob, json, os, sys
runs = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "part_*.json"))):
    runs[os.path.basename(path)[5:-5]] = json.load(open(path))
json.dump(runs, open(os.path.join(sys.argv[2], "gpu_allreduce.json"), "w"), indent=1)
PYEOF
  rm -rf "$PARTS"
}

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  PYCOMM_GPU_SYNC=host timed "$(limit 120)" mpirun -n 2 $PY bench/gpu_allreduce.py --max-bytes 65536 \
    --json "$PARTS/part_host_p2.json" >"$OUT/gpu_allreduce.txt" 2>&1
  rc=$?
  step "GPU allreduce bench host P=2, 8 B-64 KiB" "exit $rc"
  merge_parts
  cat "$OUT/gpu_allreduce.txt"
  printf '%s\n' "${summary[@]}"
  echo "total: $SECONDS s"
  exit $rc
fi

# 3. Kernels
timed "$(limit 120)" ./build/gpu-check/reduce_bench >"$OUT/reduce_bench.txt" 2>&1
step "kernel check + bandwidth" "exit $? ($(grep -o 'correctness: .*' "$OUT/reduce_bench.txt"))"

# 4. GPU allreduce benchmark, with each way of ordering the ranks' GPU work
for sync in host stream; do
  for p in 2 4; do
    [ $sync = stream ] && [ $p = 4 ] && continue  # measured once (2026-11-27): 2x P=2's flat cost
    PYCOMM_GPU_SYNC=$sync timed "$(limit 90)" mpirun -n $p $PY bench/gpu_allreduce.py --json "$PARTS/part_${sync}_p$p.json" \
      >>"$OUT/gpu_allreduce.txt" 2>&1
    step "GPU allreduce bench $sync P=$p" "exit $?"
  done
done
# 5. Split work forced on the one GPU (auto picks it where each rank has a GPU of its own)
PYCOMM_GPU_WORK=split timed "$(limit 60)" mpirun -n 2 $PY bench/gpu_allreduce.py --max-bytes $((64 << 20)) \
  --json "$PARTS/part_split_p2.json" >>"$OUT/gpu_allreduce.txt" 2>&1
step "GPU allreduce bench split P=2" "exit $?"
# 5a. Across 2 simulated nodes of 1 rank (leaders combine through pinned host memory + the CPU ring)
PYCOMM_RANKS_PER_NODE=1 MPIR_CVAR_NOLOCAL=1 timed "$(limit 90)" mpirun -n 2 $PY bench/gpu_allreduce.py --max-bytes $((64 << 20)) \
  --json "$PARTS/part_host_2nodes.json" >>"$OUT/gpu_allreduce.txt" 2>&1
step "GPU allreduce bench 2 nodes x 1" "exit $?"
# 6. GPU tests, after the benchmarks: they have grown, and whatever time is left goes to them
# One test at most 150 s (pytest-timeout, on the image): a hang fails that test with its ranks'
# output and the next runs. -v names each test as it ends; -rfEs lists failures, errors and skips.
per_test=$($PY -c "import pytest_timeout" >/dev/null 2>&1 && echo --timeout=150)
timed "$(limit 330)" $PY -m pytest -v -p no:cacheprovider -m gpu -rfEs $per_test --durations=25 \
  tests/test_gpu_mpi.py tests/test_gpu_dlpack_mpi.py --deselect "tests/test_gpu_mpi.py::test_benchmark_cli_on_gpu_arrays[cupy-float32]" \
  >"$OUT/gpu_tests.txt" 2>&1
step "GPU tests (-m gpu)" "exit $? ($(tail -1 "$OUT/gpu_tests.txt"))"
# 7. The trainer on cupy arrays (its data sets come with scikit-learn, which the machine may lack)
if $PY -c "import sklearn" >/dev/null 2>&1; then
  timed "$(limit 90)" mpirun -n 2 $PY -m pycomm.train --device gpu --check --steps 40 --no-progress >"$OUT/train_gpu.txt" 2>&1
  step "train --device gpu --check P=2" "exit $?"
else
  step "train --device gpu --check P=2" "not run: no scikit-learn here"
fi

# 8. The benchmark CLI on cupy arrays, against host staging + MPI_Allreduce (what gpu_allreduce.py
#    times at 64 MiB), nccl-tests' table
#    (its table goes into gpu_allreduce.txt and .json: the device tool brings back 8 files at most)
cli=/tmp/pycomm_bench_cli_p2.txt
timed "$(limit 60)" mpirun -n 2 $PY -m pycomm.bench --device gpu -b 16 -e 64M -f 4 --vs mpi \
  --json "$PARTS/part_bench_cli_p2.json" >"$cli" 2>&1
step "pycomm.bench --device gpu P=2" "exit $? ($(grep -o 'Wrong elements: .*' "$cli"))"
cat "$cli" >>"$OUT/gpu_allreduce.txt"
# 8a. The CLI's other collectives on cupy arrays, in NCCL's in-place forms (FSDP's allgather), short
for c in allgather reduce_scatter; do
  timed "$(limit 30)" mpirun -n 2 $PY -m pycomm.bench --device gpu --collective $c --in-place -b 1K -e 4M -f 64 --vs mpi \
    --json "$PARTS/part_bench_cli_${c}_p2.json" >"$cli" 2>&1
  step "pycomm.bench --device gpu --collective $c" "exit $? ($(grep -o 'Wrong elements: .*' "$cli"))"
  cat "$cli" >>"$OUT/gpu_allreduce.txt"
done

merge_parts

echo
grep -vE "^FAIL" "$OUT/reduce_bench.txt" | tail -12
grep -E "^FAIL" "$OUT/reduce_bench.txt" | head -5
echo
cat "$OUT/gpu_allreduce.txt"
grep -E "FAIL|Error|error" "$OUT/gpu_tests.txt" | head -20
echo
printf '%s\n' "${summary[@]}"
echo "total: $SECONDS s"
