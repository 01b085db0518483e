"""CPU smoke test of benchmarks/bench_draft_loop.py (torch fallbacks, tiny shapes): every way drafts the same tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_draft_loop.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_draft_loop", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_draft_rounds_draft_identical_tokens_on_cpu(tmp_path):
    bench = _load()
    args = ["--device", "cpu", "--batch", "3", "--ks", "1", "2", "--rounds", "2", "--warmup", "1"]
    args += ["--repeats", "1", "--hidden", "128", "--heads", "2", "--kv-heads", "1", "--vocab", "64"]
    args += ["--prompt-len", "8", "--page-size", "4", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    (js,) = tmp_path.glob("*-draft-loop.json")
    data = json.loads(js.read_text())
    assert not data["failed"] and not data["checks"]
    assert set(data["results"]) == {"1", "2"}
    for per_mode in data["results"].values():
        assert set(per_mode) == {"decode x k", "loop"}  # no graph without CUDA
        assert per_mode["loop"]["drafts_equal_decode_x_k"] is True
        assert all(r["host_us_median"] > 0 and r["gpu_idle_us"] is None for r in per_mode.values())
    assert data["prepare_decode_us"] > 0
    for k, t in data["round_vs_one_prepare_decode"].items():
        assert t["ratio"] == data["results"][k]["loop"]["host_us_median"] / data["prepare_decode_us"]
    (md,) = tmp_path.glob("*-draft-loop.md")
    text = md.read_text()
    assert "| 2 | loop |" in text and "less than one `prepare_decode`" in text
