"""CPU smoke test of benchmarks/bench_decode_loop.py's speculative loops (torch fallbacks, tiny shapes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decode_loop.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_decode_loop", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spec_loops_accept_identical_tokens_on_cpu(tmp_path):
    bench = _load()
    if not bench.HAS_SPECULATION:
        pytest.skip("no speculative API")
    # A small vocabulary repeats tokens soon: the drafter's lookups find some.
    args = [
        "--device",
        "cpu",
        "--spec",
        "2",
        "--batch",
        "3",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--layers",
        "1",
        "--hidden",
        "128",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--vocab",
        "16",
        "--prompt-len",
        "12",
        "--repeats",
        "1",
        "--calib",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(args) == 0
    (js,) = tmp_path.glob("*-decode-loop-spec2.json")
    data = json.loads(js.read_text())
    assert not data["failed"]
    eager = data["summary"]["eager"]
    assert set(eager) == {"sync", "overlap", "ratios"}
    for loop in ("sync", "overlap"):
        assert 1.0 <= eager[loop]["accepted_per_step"] <= 3.0
    assert "accepted identical tokens" in data["checks"][0]
    (md,) = tmp_path.glob("*-decode-loop-spec2.md")
    assert "accepted tokens/step" in md.read_text()


def test_spec_argument_checks():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--spec", "-1"])
