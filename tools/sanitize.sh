#!/usr/bin/env bash
# The sanitizer run: the C++ core built with AddressSanitizer + UndefinedBehaviorSanitizer
# (-DPYCOMM_SANITIZE=ON), then the C++ tier and the Python tests on that build.
#
#   bash tools/sanitize.sh             # ~6 min on 2 cores (build ~1.5 min, tests ~4 min)
#   bash tools/sanitize.sh -k 'not 4'  # extra arguments go to each pytest run
#
# 1. builds _core, libpycomm_mpi.so and the C++ test program into build/asan (CMake, gcc);
# 2. stages a copy of pycomm/ with the sanitized _core and interposer in build/asan/site, first on
#    PYTHONPATH (nothing is copied into pycomm/, so normal builds are not shadowed);
# 3. runs the C++ tier (ranks as threads over the loopback transport), the device collectives on
#    the fake CUDA runtime included where the CUDA toolkit is;
# 4. runs test_api, test_kernels, test_collectives_mpi, test_lifecycle_mpi, test_preload_mpi and
#    test_train_mpi (not those marked slow or gpu): tools/sanitize/sitecustomize.py preloads
#    libasan and libubsan into pytest and every Python process it starts, mpirun's ranks included.
# Leaks are not checked (the interpreter itself leaks). Any other ASan report or any UBSan "runtime
# error" ends its process, and every report is written to build/asan/logs/reports, so one in a
# process a test expects to fail (the fault-injection tests) is caught too. Logs: build/asan/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$PWD/build/asan
LOGS=$BUILD/logs
PY=${PYTHON:-$(command -v python3)}
start=$SECONDS
mkdir -p "$LOGS"

# 1. Build
echo "== build (PYCOMM_SANITIZE=ON) in $BUILD"
generator=()
if command -v ninja >/dev/null && [[ ! -f $BUILD/CMakeCache.txt ]]; then generator=(-G Ninja); fi
if ! { cmake -S . -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYCOMM_SANITIZE=ON \
  -DPYCOMM_CUDA=OFF -DPYCOMM_BUILD_PYTHON=ON -DPYCOMM_BUILD_PRELOAD=ON -DPYCOMM_BUILD_TESTS=ON \
  -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
  cmake --build "$BUILD" -j "${JOBS:-2}"; } >"$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log"
  echo "sanitize: the build failed (log: $LOGS/build.log)"
  exit 1
fi

# 2. Stage the package
SITE=$BUILD/site
rm -rf "$SITE"
mkdir -p "$SITE"
cp -r pycomm "$SITE/"
find "$SITE" \( -name __pycache__ -o -name '*.so' \) -prune -exec rm -rf {} +
cp "$BUILD"/_core*.so "$BUILD/libpycomm_mpi.so" "$SITE/pycomm/"
cp tools/sanitize/sitecustomize.py "$SITE/"

# The sanitizer environment: sitecustomize.py preloads the runtimes into every Python process.
PYCOMM_SANITIZER_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
REPORTS=$LOGS/reports
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
export PYCOMM_SANITIZER_PRELOAD PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:log_path=$REPORTS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}

loaded=$("$PY" -c "import pycomm._core as c; print(c.__file__, 'libasan.so' in open('/proc/self/maps').read())")
if [[ $loaded != "$SITE/pycomm/_core"*" True" ]]; then
  echo "sanitize: Python does not load the sanitized pycomm._core with libasan: $loaded"
  exit 1
fi

failed=()
run() { # name, command...
  local name=$1 t0=$SECONDS
  shift
  echo "== $name"
  if "$@" >"$LOGS/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s): $(tail -1 "$LOGS/$name.log")"
  else
    echo "   FAILED ($((SECONDS - t0)) s): $(tail -1 "$LOGS/$name.log") (log: $LOGS/$name.log)"
    failed+=("$name")
  fi
  if [[ -n $(ls -A "$REPORTS") ]]; then
    echo "   sanitizer reports:"
    for report in "$REPORTS"/*; do
      echo "   --- $report"
      head -30 "$report"
      mv "$report" "$LOGS/$name.$(basename "$report")"
    done
    [[ " ${failed[*]:-} " == *" $name "* ]] || failed+=("$name")
  fi
}

run cpp "$BUILD/pycomm_cpp_tests"
# Built where the CUDA toolkit's headers are: the device collectives on the fake CUDA runtime.
if [[ -x $BUILD/pycomm_device_fake_tests ]]; then run cpp-device "$BUILD/pycomm_device_fake_tests"; fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --durations=5 -m "not slow and not gpu" "$@")
run api "${PYTEST[@]}" tests/test_api.py tests/test_kernels.py
run collectives "${PYTEST[@]}" tests/test_collectives_mpi.py
run lifecycle "${PYTEST[@]}" tests/test_lifecycle_mpi.py
run preload "${PYTEST[@]}" tests/test_preload_mpi.py
run train "${PYTEST[@]}" tests/test_train_mpi.py

echo "sanitize: $((SECONDS - start)) s in all"
if ((${#failed[@]})); then
  echo "sanitize: FAILED: ${failed[*]}"
  exit 1
fi
echo "sanitize: clean"
