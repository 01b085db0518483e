#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash scripts/dev.sh demo | test [pytest args] | lint | bench | bench-steps | bench-loop | profile-step | help
# Creates .venv/ on first use and installs what is missing, one line per stage (idempotent: a second
# run installs nothing). PyTorch is taken as torch==2.13.0 when none is installed: the CPU wheel
# (PyTorch's CPU index) where no NVIDIA GPU is visible, and FlashInfer (the `flashinfer` extra) where
# one is. Set BATCHMETA_PYTHON to use another interpreter (for example one with a CUDA build of torch).
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
  bench         benchmarks/bench_launch.py [args]          (needs a CUDA GPU)
  bench-steps   benchmarks/bench_steps.py [args]           (needs a CUDA GPU and FlashInfer)
  bench-loop    benchmarks/bench_decode_loop.py [args]     (needs a CUDA GPU and FlashInfer)
  profile-step  benchmarks/profile_step.py [args]          (needs a CUDA GPU and FlashInfer)
  help          print this message (also -h, --help)

demo, test and lint run on a CPU. Creates .venv/ on first use (torch's CPU wheel when no NVIDIA GPU
is visible; FlashInfer when one is); set BATCHMETA_PYTHON to use another interpreter.
USAGE
}

# Usage and unknown commands are handled before anything is created or installed.
case "$cmd" in
  -h | --help | help) usage; exit 0 ;;
  demo | test | lint | bench | bench-steps | bench-loop | profile-step) ;;
  *) echo "dev.sh: unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac

say() { echo "dev.sh: $*" >&2; }

if [[ -n "${BATCHMETA_PYTHON:-}" ]]; then
  py=$BATCHMETA_PYTHON
else
  if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    python3 -m venv .venv
  fi
  py=.venv/bin/python
fi
pip=("$py" -m pip install -q --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1; then gpu=1; else gpu=0; fi

# Reinstall the package only when pyproject.toml changed since the last install.
stamp=.venv/.batchmeta-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp" 2>/dev/null) != "$want" ]] || ! "$py" -c "import batchmeta, pytest, ruff" 2>/dev/null; then
  if ! "$py" -c "import torch" 2>/dev/null; then
    if [[ $gpu == 1 ]]; then
      say "installing torch==2.13.0…"
      "${pip[@]}" torch==2.13.0
    else
      # No NVIDIA GPU: the CPU wheel (about 0.2 GB instead of several GB of CUDA libraries).
      say "installing torch==2.13.0 (CPU wheel)…"
      "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 || {
        say "PyTorch's CPU index failed; installing torch==2.13.0 from the default index…"
        "${pip[@]}" torch==2.13.0
      }
    fi
  fi
  extras=dev,examples
  [[ $gpu == 1 ]] && extras=$extras,flashinfer
  say "installing batchmeta[$extras]…"
  "${pip[@]}" -e ".[$extras]"
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
