"""One plot of busbw against size at P=2: pycomm and every CPU baseline, from recorded runs.

    python bench/plot_baselines.py MPICH_RUN.json OPENMPI_RUN.json GLOO_RUN.json OUT.png

The first two are `python -m pycomm.bench --vs mpi --json` runs (pycomm built against MPICH and
against Open MPI, each with its MPI_Allreduce measured in the same run), the third is
bench/gloo_allreduce.py's --json.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(mpich_path, openmpi_path, gloo_path, out_path):
    mpich, openmpi, gloo = (json.load(open(p)) for p in (mpich_path, openmpi_path, gloo_path))
    fig, ax = plt.subplots(figsize=(8, 5))

    def curve(rows, key, label, marker, size_key="size"):
        ax.plot([r[size_key] for r in rows], [r[key] for r in rows], marker=marker, label=label)

    curve(mpich["rows"], "busbw", "pycomm (MPICH build)", "o")
    curve(openmpi["rows"], "busbw", "pycomm (Open MPI build)", ".")
    curve(mpich["rows"], "mpi_busbw", "MPICH MPI_Allreduce", "s")
    curve(openmpi["rows"], "mpi_busbw", "Open MPI MPI_Allreduce", "^")
    curve(gloo["rows"], "gloo_busbw", "torch.distributed gloo", "v")
    floor = [r for r in mpich["rows"] if r.get("floor_busbw")]
    ax.plot([r["size"] for r in floor], [r["floor_busbw"] for r in floor], "--", color="gray", label="memory floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"allreduce float32 sum, P=2, {mpich['metadata']['hostname']}, {mpich['metadata']['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    print(f"plot written to {out_path}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
