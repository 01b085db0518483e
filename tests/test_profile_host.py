"""benchmarks/profile_host.py, the CPU microbenchmark of prepare_decode's host path: it runs on any machine."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_host_runs_on_a_cpu():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "profile_host.py"),
            "--batch",
            "8",
            "--steps",
            "20",
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(
        r"prepare_decode, B=8, inputs as int64 numpy arrays, fills stubbed: [0-9.]+ µs/step .*\n", res.stdout
    )
