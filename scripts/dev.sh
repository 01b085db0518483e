#!/usr/bin/env bash
# One entry point for a fresh machine:  bash scripts/dev.sh demo | test [pytest args] | bench | bench-steps | profile-step
# Creates .venv/ on first use and installs what is missing (idempotent: a second run installs
# nothing). PyTorch is taken as torch==2.13.0 when none is installed; set BATCHMETA_PYTHON to use
# another interpreter (for example one that already has a CUDA build of torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cmd=${1:-test}
shift || true

if [[ -n "${BATCHMETA_PYTHON:-}" ]]; then
  py=$BATCHMETA_PYTHON
else
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  py=.venv/bin/python
fi

# Reinstall the package only when pyproject.toml changed since the last install.
stamp=.venv/.batchmeta-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp" 2>/dev/null) != "$want" ]] || ! "$py" -c "import batchmeta, pytest" 2>/dev/null; then
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q torch==2.13.0
  "$py" -m pip install -q -e ".[dev]"
  mkdir -p "$(dirname "$stamp")" && echo "$want" > "$stamp"
fi

case "$cmd" in
  demo)  exec "$py" -m batchmeta.demo "$@" ;;
  test)  exec "$py" -m pytest -q "$@" ;;
  bench) exec "$py" benchmarks/bench_launch.py "$@" ;;
  bench-steps) exec "$py" benchmarks/bench_steps.py "$@" ;;
  profile-step) exec "$py" benchmarks/profile_step.py "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test|bench|bench-steps|profile-step [args]" >&2; exit 2 ;;
esac
