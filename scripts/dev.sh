#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash scripts/dev.sh demo | test [pytest args] | lint | bench | bench-steps | bench-loop | profile-step | help
# Creates .venv/ on first use and installs what is missing (idempotent: a second run installs
# nothing). PyTorch is taken as torch==2.13.0 when none is installed; set BATCHMETA_PYTHON to use
# another interpreter (for example one that already has a CUDA build of torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cmd=${1:-test}
shift || true

usage() {
  cat <<'USAGE'
usage: bash scripts/dev.sh <command> [args]

commands:
  demo          run the serving-loop demo (python -m batchmeta.demo [args])
  test          run the tests (pytest -q [args]); the default
  lint          ruff check . and ruff format --check .
  bench         benchmarks/bench_launch.py [args]
  bench-steps   benchmarks/bench_steps.py [args]
  bench-loop    benchmarks/bench_decode_loop.py [args]
  profile-step  benchmarks/profile_step.py [args]
  help          print this message (also -h, --help)

Creates .venv/ on first use; set BATCHMETA_PYTHON to use another interpreter.
USAGE
}

# Usage and unknown commands are handled before anything is created or installed.
case "$cmd" in
  -h | --help | help) usage; exit 0 ;;
  demo | test | lint | bench | bench-steps | bench-loop | profile-step) ;;
  *) echo "dev.sh: unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac

if [[ -n "${BATCHMETA_PYTHON:-}" ]]; then
  py=$BATCHMETA_PYTHON
else
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  py=.venv/bin/python
fi

# Reinstall the package only when pyproject.toml changed since the last install.
stamp=.venv/.batchmeta-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp" 2>/dev/null) != "$want" ]] || ! "$py" -c "import batchmeta, pytest, ruff" 2>/dev/null; then
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q torch==2.13.0
  "$py" -m pip install -q -e ".[dev,examples]"
  mkdir -p "$(dirname "$stamp")" && echo "$want" > "$stamp"
fi

case "$cmd" in
  demo)  exec "$py" -m batchmeta.demo "$@" ;;
  test)  exec "$py" -m pytest -q "$@" ;;
  lint)
    rc=0
    "$py" -m ruff check . || rc=1
    "$py" -m ruff format --check . || rc=1
    exit "$rc" ;;
  bench) exec "$py" benchmarks/bench_launch.py "$@" ;;
  bench-steps) exec "$py" benchmarks/bench_steps.py "$@" ;;
  bench-loop) exec "$py" benchmarks/bench_decode_loop.py "$@" ;;
  profile-step) exec "$py" benchmarks/profile_step.py "$@" ;;
esac
