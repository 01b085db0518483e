"""Developer tooling: scripts/dev.sh, the lint gate, and the demo's output when stderr is not a terminal."""

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV_SH = ROOT / "scripts" / "dev.sh"
COMMANDS = ("demo", "test", "lint", "bench", "bench-steps", "bench-loop", "profile-step")


def _dev_sh(*args: str) -> subprocess.CompletedProcess:
    # An interpreter that does not exist: any attempt to create a venv or install would fail.
    env = {**os.environ, "BATCHMETA_PYTHON": "/nonexistent/python"}
    return subprocess.run(["bash", str(DEV_SH), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("arg", ["--help", "-h", "help"])
def test_dev_sh_help_installs_nothing(arg):
    res = _dev_sh(arg)
    assert res.returncode == 0, res.stderr
    for cmd in COMMANDS:
        assert cmd in res.stdout
    assert res.stderr == ""


def test_dev_sh_unknown_command_is_usage_error():
    res = _dev_sh("no-such-command")
    assert res.returncode == 2
    assert "no-such-command" in res.stderr
    for cmd in COMMANDS:
        assert cmd in res.stderr
    assert res.stdout == ""


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_clean(args):
    """What `bash scripts/dev.sh lint` (and so .ci/run) checks."""
    res = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_demo_progress_not_drawn_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    from batchmeta import demo

    err = io.StringIO()  # isatty() is False, as for a log file or a pipe
    monkeypatch.setattr(sys, "stderr", err)
    rc = demo.main(["--requests", "3", "--max-num-reqs", "2", "--token-budget", "32", "--seed", "1"])
    assert rc == 0
    assert "\r" not in err.getvalue()
    assert err.getvalue() == ""
    assert "all checks passed" in capsys.readouterr().out  # the summary table on stdout stays
