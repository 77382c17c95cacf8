"""MPI_Allreduce with and without libpycomm_mpi.so preloaded: bench/osu_allreduce.c, unchanged.

    python bench/preload_bench.py                      # P=2, 4 B .. 64 MiB, 5 repeats
    python bench/preload_bench.py -n 2 4 -r 3 -m 4:16M --markdown out.md
    python bench/preload_bench.py -t                   # MPI at MPI_THREAD_MULTIPLE, as under mpi4py

Builds osu_allreduce with the mpicc beside mpirun, then for each P runs it R times without and R
times with the interposer, interleaved (the order alternates per repeat, so drift on a shared
machine hits both alike). Prints, per size, the median over repeats of the average latency across
ranks, and the ratio MPI / pycomm (above 1: the interposer is faster).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROW = re.compile(r"^(?:\[\d+\] )?(\d+)\s+([\d.]+)", re.M)


def mpirun():
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


def build(out_dir: Path) -> Path:
    mpicc = Path(mpirun()).parent / "mpicc"
    mpicc = str(mpicc) if mpicc.exists() else shutil.which("mpicc")
    if not mpicc:
        sys.exit("preload_bench: no mpicc beside mpirun or on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "osu_allreduce"
    subprocess.run([mpicc, "-O2", "-o", str(exe), str(HERE / "osu_allreduce.c")], check=True, timeout=300)
    return exe


def library() -> str:
    printed = subprocess.run([sys.executable, "-m", "pycomm.preload"], capture_output=True, text=True, check=True)
    return printed.stdout.strip()


def run(exe, nprocs, osu_args, preload, timeout):
    cmd = [mpirun(), "-n", str(nprocs)]
    if preload:
        cmd += ["-genv", "LD_PRELOAD", preload]
    cmd += [str(exe), *osu_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or "FAIL" in done.stdout:
        sys.exit(f"preload_bench: {' '.join(cmd)} failed\n{done.stdout}\n{done.stderr}")
    return {int(size): float(us) for size, us in ROW.findall(done.stdout)}


def human(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size // scale} {unit}"
    return f"{size} B"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--nprocs", type=int, nargs="+", default=[2])
    parser.add_argument("-r", "--repeats", type=int, default=5)
    parser.add_argument("-m", "--sizes", default="4:64M", help="MIN:MAX bytes, as osu_allreduce -m")
    parser.add_argument("-i", "--iters", type=int, default=1000, help="osu_allreduce -i (a tenth above 1 MiB)")
    parser.add_argument("-x", "--warmup", type=int, default=100)
    parser.add_argument("-c", "--check", action="store_true", help="validate results (osu_allreduce -c)")
    parser.add_argument(
        "-t", "--thread-multiple", action="store_true", help="MPI_Init_thread(MPI_THREAD_MULTIPLE), as mpi4py does"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mpirun")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()

    exe = build(ROOT / "build" / "preload-bench")
    lib = library()
    osu_args = ["-m", args.sizes, "-i", str(args.iters), "-x", str(args.warmup)]
    osu_args += (["-c"] if args.check else []) + (["-t"] if args.thread_multiple else [])
    lines = [f"# osu_allreduce {' '.join(osu_args)}; preload {lib}", ""]
    for nprocs in args.nprocs:
        plain, ours = [], []
        for repeat in range(args.repeats):
            order = [(plain, None), (ours, lib)] if repeat % 2 == 0 else [(ours, lib), (plain, None)]
            for results, preload in order:
                results.append(run(exe, nprocs, osu_args, preload, args.timeout))
            print(f"P={nprocs}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        lines += [
            f"## P={nprocs}, median of {args.repeats} runs each (us per call, average over ranks)",
            "",
            "| size | MPICH | pycomm preload | ratio MPICH/pycomm |",
            "|---:|---:|---:|---:|",
        ]
        for size in sorted(plain[0]):
            mpi = statistics.median(r[size] for r in plain)
            pyc = statistics.median(r[size] for r in ours)
            lines.append(f"| {human(size)} | {mpi:.2f} | {pyc:.2f} | {mpi / pyc:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
