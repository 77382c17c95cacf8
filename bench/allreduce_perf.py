"""Same as `python -m pycomm.bench`, e.g. mpirun -n 2 python bench/allreduce_perf.py -e 64M --vs mpi."""

from pycomm.bench import main

raise SystemExit(main())
