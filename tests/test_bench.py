"""The benchmark commands the README and bench/README.md give still run (on tiny sizes:
what they measure is not checked here, only that each prints its table)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

CASES = [
    (["bench/steps.py", "--jobs", "300", "--repeats", "1", "--no-bullmq"], "campaign step"),
    (["bench/lateness.py", "--rate", "50", "--seconds", "0.5", "--repeats", "1"], "campaign step"),
    (
        ["bench/enroll.py", "--contacts", "300", "--batch", "100", "--single", "20", "--runs", "1"],
        "enroll_many",
    ),
    (["bench/memory.py", "--contacts", "300"], "bytes per enrollment"),
    (["bench/scale.py", "--sizes", "300"], "bytes per enrollment"),
    (
        [
            "bench/cluster.py",
            "--jobs",
            "200",
            "--repeats",
            "1",
            "--shards",
            "3",
            "--idle-seconds",
            "0.5",
            "--deadline",  # a hang prints its stacks (it hung twice in CI runs, once unseen)
            "80",
        ],
        "cluster, 3 masters",
    ),
    (
        # exits non-zero unless every enrollment was made and every lookup answered 200
        [
            "bench/api.py",
            "--contacts",
            "300",
            "--lookups",
            "200",
            "--runs",
            "1",
            "--deadline",
            "80",
        ],
        "GET /v1/enrollments/{id}",
    ),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[c[0][0] for c in CASES])
def test_benchmark_command_runs(argv: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert expected in done.stdout and "|" in done.stdout, done.stdout[-2000:]
