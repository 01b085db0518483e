"""CPU smoke test of benchmarks/bench_cp.py (gloo ranks, torch fallbacks, tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cp.py"


def test_bench_cp_runs_two_gloo_ranks_beside_one(tmp_path):
    # A process of its own: the spawned ranks import the script by path, which a module loaded from a
    # file inside pytest is not.
    args = ["--device", "cpu", "--world", "2", "--batch", "3", "--context", "100", "--steps", "2", "--warmup", "1"]
    args += ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--interleave", "4", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (js,) = tmp_path.glob("cpu-*-cp2.json")
    rows = json.loads(js.read_text())["rows"]
    assert sorted((r["world_size"], r["rank"]) for r in rows) == [(1, 0), (2, 0), (2, 1)]
    by = {(r["world_size"], r["rank"]): r for r in rows}
    # Each token's KV on exactly one rank: the shares add up to the whole.
    assert by[2, 0]["local_kv_tokens"] + by[2, 1]["local_kv_tokens"] == by[1, 0]["local_kv_tokens"]
    for r in rows:
        assert r["host_us"] > 0 and r["gpu_step_us"] is None and r["gpu_merge_us"] is None  # no GPU figures
    (md,) = tmp_path.glob("cpu-*-cp2.md")
    assert "| 2 | 1 |" in md.read_text()
