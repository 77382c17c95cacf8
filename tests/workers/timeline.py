"""PYCOMM_TIMELINE under mpirun: every rank's calls, from a communicator on the world and one on a
sub-communicator, land in the one trace file, readable as it stands and with clocks lined up.

usage: timeline.py PATH
"""

import json
import sys

import numpy as np
from common import Failures
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank
path = sys.argv[1]
f = Failures()

comm = pycomm.Communicator()  # PYCOMM_TIMELINE comes from the environment
half = pycomm.Communicator(world.Split(RANK % 2, RANK))
a = np.ones(10, np.float32)
comm.allreduce(a, out=a)
comm.broadcast(a, root=P - 1)
comm.allgather(a)
comm.reduce_scatter(np.ones(2 * P), op="max")
half.allreduce(np.ones(3))
comm.allreduce_async(a, out=a).wait()
try:
    comm.allreduce(np.ones(3, bool))
except TypeError:
    pass
comm.barrier()
comm.close()
half.close()
world.Barrier()

if RANK == 0:
    text = open(path).read()
    f.check(text.startswith("[\n"), "the file starts the JSON array")
    events = json.loads(text.rstrip().rstrip(",") + "]")  # the trace format's closing ] is optional
    calls = [e for e in events if e["ph"] == "X"]
    want = [
        "allreduce",
        "broadcast",
        "allgather",
        "reduce_scatter",
        "allreduce",
        "allreduce_async",
        "allreduce_async: wait",
        "allreduce",
        "barrier",
    ]
    for r in range(P):
        mine = [e for e in calls if e["pid"] == r]
        f.check([e["name"] for e in mine] == want, f"rank {r}'s events: {[e['name'] for e in mine]}")
        f.check(all(e["dur"] >= 0 for e in mine), f"rank {r}: negative durations")
        f.check(all(a["ts"] <= b["ts"] for a, b in zip(mine, mine[1:])), f"rank {r}: events out of order")
        f.check(mine[0]["args"] == {"bytes": 40, "dtype": "float32", "in_place": True}, f"args {mine[0]['args']}")
        f.check(mine[1]["args"].get("root") == str(P - 1), f"broadcast args {mine[1]['args']}")
        f.check("dtype bool is not supported" in mine[7]["args"].get("error", ""), f"error {mine[7]['args']}")
        f.check(mine[6]["args"]["ran_us"] >= 0, "the async work's run time")
        names = [e["args"]["name"] for e in events if e["ph"] == "M" and e["pid"] == r]
        f.check(names and set(names) == {f"rank {r}"}, f"rank {r}'s process name: {names}")
    # No rank leaves a barrier before every rank has entered it: with the clocks lined up, every
    # barrier starts before every other ends (up to the alignment's skew: 20 ms on a loaded VM).
    barriers = [e for e in calls if e["name"] == "barrier"]
    f.check(
        max(e["ts"] for e in barriers) <= min(e["ts"] + e["dur"] for e in barriers) + 20e3,
        f"barriers do not overlap: {[(e['ts'], e['dur']) for e in barriers]}",
    )

# A sub-communicator without world rank 0 starts a file of its own.
color = RANK % 2
group_path = f"{path}.group{color}"
with pycomm.Communicator(world.Split(color, RANK), timeline=group_path) as group:
    group.allreduce(np.ones(2))
world.Barrier()
if RANK < 2:  # the lowest world rank of each group reads its file
    events = json.loads(open(group_path).read().rstrip().rstrip(",") + "]")
    pids = {e["pid"] for e in events if e["ph"] == "X" and e["name"] == "allreduce"}
    f.check(pids == {r for r in range(P) if r % 2 == color}, f"group {color}'s file: {pids}")

# `{rank}` in the path: a file per rank, each started by its rank (the form for several nodes).
# A dup() traces into its original's file.
with pycomm.Communicator(timeline=path + ".{rank}") as own, own.dup() as twin:
    own.barrier()
    twin.allgather(np.ones(1))
mine = open(f"{path}.{RANK}").read()
events = json.loads(mine.rstrip().rstrip(",") + "]") if mine.startswith("[\n") else None
f.check(events is not None and {e["pid"] for e in events} == {RANK}, f"rank {RANK}'s own file: {mine[:200]}")
names = [e["name"] for e in events or [] if e["ph"] == "X"]
f.check(names == ["barrier", "allgather"], f"rank {RANK}'s own file, the dup's call traced: {names}")

# Paths that differ between ranks, set on some ranks only, or a file that no rank can open: every
# rank raises at creation, before any collective that could leave the others waiting.
cases = [("unopenable", f"{path}.d/missing/x.json", OSError)]
if P > 1:
    cases.append(("some ranks only", path if RANK == 0 else "", ValueError))
    cases.append(("other paths", f"{path}.{RANK}", ValueError))
for name, mine, error in cases:
    try:
        pycomm.Communicator(timeline=mine).close()
        f.check(False, f"{name}: no error")
    except error as e:
        f.check("timeline" in str(e), f"{name}: {e}")
f.finish()
