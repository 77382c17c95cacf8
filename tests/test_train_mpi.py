"""`python -m pycomm.train` under mpirun: the --check properties, checkpoints and resume, errors."""

import json
import os

import numpy as np
import pytest
from launch import run_mpi

pytestmark = pytest.mark.mpi

SMALL = ("--width", "32", "--no-progress")


def train(nprocs, *args, check=True, timeout=180):
    return run_mpi(nprocs, "-m", "pycomm.train", *SMALL, *args, check=check, timeout=timeout)


@pytest.mark.parametrize(
    "nprocs, args",
    [
        (1, ("--steps", "15")),
        (2, ("--steps", "30")),
        (3, ("--steps", "20", "--batch", "96")),
        (4, ("--steps", "20", "--bucket-mb", "0.001")),  # many buckets, started in order
        (2, ("--steps", "20", "--no-overlap")),
        (2, ("--steps", "20", "--dtype", "float64")),
        (2, ("--model", "linear", "--epochs", "20")),
    ],
)
def test_check_passes(nprocs, args, tmp_path):
    summary_path = tmp_path / "summary.json"
    result = train(nprocs, "--check", "--json", summary_path, *args)
    assert "check: parameters bitwise identical on every rank" in result.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["ranks"] == nprocs
    assert summary["identical_steps"] == summary["steps"] > 0
    assert summary["max_reference_diff"] <= 1e-3
    assert 0.0 <= summary["comm_hidden_fraction"] <= 1.0
    if nprocs > 1:
        assert summary["comm_seconds"] > 0
    if "--model" not in args:
        assert summary["buckets"] == (6 if "0.001" in args else 1)  # 1 KiB: one per parameter


def test_learns(tmp_path):
    summary_path = tmp_path / "summary.json"
    train(2, "--epochs", "10", "--json", summary_path)
    summary = json.loads(summary_path.read_text())
    assert summary["test_accuracy"] > 0.9, summary


def test_check_fails_when_runs_differ():
    # 2 ranks average shard gradients in another order of rounding than 1 rank: no tolerance at
    # all must make the comparison fail, and the run exit non-zero.
    result = train(2, "--check", "--check-tol", "0", "--steps", "10", check=False)
    assert result.returncode != 0
    assert "check FAILED: parameters differ from 1-rank training" in result.stdout


def test_batch_must_split_evenly():
    result = train(3, "--batch", "128", "--steps", "2", check=False)
    assert result.returncode != 0
    assert "must divide evenly over 3 ranks" in result.stdout


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--width", "0"), ("--every", "0"), ("--steps", "-5")])
def test_bad_flags_are_usage_errors(flag, value):
    result = train(1, flag, value, check=False)
    assert result.returncode == 2 and f"argument {flag}: must be at least" in result.stdout, result.stdout


def test_resuming_a_finished_run_with_check_passes(tmp_path):
    """Nothing is left to train, so nothing is compared: not a check failure."""
    path = tmp_path / "ckpt.npz"
    train(2, "--steps", "4", "--checkpoint", path)
    result = train(2, "--steps", "4", "--checkpoint", path, "--resume", "--check", check=False)
    assert result.returncode == 0 and "FAILED" not in result.stdout, result.stdout


def _params(path):
    with np.load(path) as f:
        return int(f["step"]), f["params"].copy(), f["velocity"].copy()


def test_killed_run_resumes_to_the_same_result(tmp_path):
    whole, killed = tmp_path / "whole.npz", tmp_path / "killed.npz"
    train(2, "--steps", "40", "--checkpoint", whole, "--every", "10")
    # Every rank is SIGKILLed after step 25, after the checkpoint of step 20.
    result = train(2, "--steps", "40", "--checkpoint", killed, "--every", "10", "--kill-at-step", "25", check=False)
    assert result.returncode != 0
    assert _params(killed)[0] == 20
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]  # no torn temporary file either
    train(2, "--steps", "40", "--checkpoint", killed, "--every", "10", "--resume", "--check")
    step_a, params_a, velocity_a = _params(whole)
    step_b, params_b, velocity_b = _params(killed)
    assert step_a == step_b == 40
    assert params_a.tobytes() == params_b.tobytes()
    assert velocity_a.tobytes() == velocity_b.tobytes()


def test_resume_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    result = train(2, "--steps", "2", "--checkpoint", path, "--resume", check=False)
    assert result.returncode != 0 and "no checkpoint at" in result.stdout
    train(2, "--steps", "2", "--checkpoint", path)
    result = train(2, "--steps", "4", "--width", "16", "--checkpoint", path, "--resume", check=False)
    assert result.returncode != 0 and "was written by a different run" in result.stdout
