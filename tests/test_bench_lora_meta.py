"""CPU smoke test of benchmarks/bench_lora_meta.py (torch fallbacks and the interpreter, tiny shapes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lora_meta.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_lora_meta", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_on_cpu_and_agrees_with_the_unique_baseline(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "rows.json"
    args = ["--device", "cpu", "--batch", "12", "--adapters", "1", "5", "--iters", "2", "--warmup", "1"]
    assert bench.main([*args, "--json", str(out)]) == 0  # run() asserts its metadata equals the baseline's
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["adapters"]) for r in rows] == [(12, 1), (12, 5)]
    for r in rows:
        assert r["ours_host_us"] > 0 and r["baseline_host_us"] > 0
        assert r["ours_gpu_us"] is None and r["baseline_gpu_us"] is None  # no GPU numbers on a CPU
        assert r["step_launch_lora_gpu_us"] is None and r["step_launch_plain_gpu_us"] is None
    assert "| 12 | 5 |" in capsys.readouterr().out
