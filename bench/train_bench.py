"""Data-parallel training throughput: P=1 against P=2 with overlap on and off, interleaved.

    python bench/train_bench.py --repeats 3 [--out bench/results/DATE-train.md]

Runs `python -m pycomm.train` under mpirun for a model with >= 20 MiB of gradients and prints
median samples/s, the communication time, and the share of it hidden behind backward.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (label, ranks, extra flags)
    ("P=1", 1, []),
    ("P=2, overlap", 2, []),
    ("P=2, no overlap", 2, ["--no-overlap"]),
]


def run(ranks: int, flags: list, model: list, timeout: float) -> dict:
    mpirun = Path(sys.executable).parent / "mpirun"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "summary.json")
        cmd = [str(mpirun), "-n", str(ranks), sys.executable, "-m", "pycomm.train", "--no-progress"]
        subprocess.run([*cmd, *model, *flags, "--json", out], check=True, timeout=timeout, stdout=subprocess.DEVNULL)
        return json.load(open(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", help="also write the table (markdown) here")
    a = p.parse_args()
    model = ["--width", str(a.width), "--layers", str(a.layers), "--batch", str(a.batch), "--steps", str(a.steps)]
    runs = {label: [] for label, _, _ in CONFIGS}
    for _ in range(a.repeats):  # interleaved, so a noisy minute hits every configuration alike
        for label, ranks, flags in CONFIGS:
            runs[label].append(run(ranks, flags, model, timeout=600))
    first = runs["P=1"][0]
    base = statistics.median(r["samples_per_s"] for r in runs["P=1"])
    lines = [
        f"`python bench/train_bench.py --repeats {a.repeats}` on {time.strftime('%Y-%m-%d')}: "
        f"{first['model']}, {first['parameters']:,} parameters, {first['gradient_mib']:.1f} MiB of gradients, "
        f"global batch {a.batch}, {a.steps} steps; medians of {a.repeats} interleaved runs.",
        "",
        "| run | samples/s | vs P=1 | comm (s) | waited (s) | hidden | buckets |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, _ in CONFIGS:
        rs = runs[label]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        lines.append(
            f"| {label} | {med['samples_per_s']:,.0f} | {med['samples_per_s'] / base:.2f}x | {med['comm_seconds']:.3f}"
            f" | {med['comm_wait_seconds']:.3f} | {100 * med['comm_hidden_fraction']:.0f}% | {rs[0]['buckets']} |"
        )
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
