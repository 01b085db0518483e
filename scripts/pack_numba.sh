#!/usr/bin/env bash
# Builds .numba/ in the project root: numba for a GPU machine with no package index (cp312,
# manylinux x86_64), to send along like .gpu/. llvmlite's wheel (~60 MB) is repacked as tar.xz
# (~40 MB) so that .numba/ and .gpu/ without its JIT cache fit one 64 MiB transfer. Idempotent.
# On the GPU machine, after `source .gpu/setup.sh`:  source .numba/setup.sh
set -euo pipefail
NUMBA_VERSION=${NUMBA_VERSION:-0.68.1}
LLVMLITE_VERSION=${LLVMLITE_VERSION:-0.50.0}
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.numba/' .git/info/exclude 2>/dev/null || echo '/.numba/' >> .git/info/exclude
mkdir -p .numba
py=${BATCHMETA_PYTHON:-python3}
if [[ ! -f .numba/llvmlite-$LLVMLITE_VERSION.tar.xz ]]; then
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" "numba==$NUMBA_VERSION" "llvmlite==$LLVMLITE_VERSION"
  cp "$tmp"/numba-*.whl .numba/
  (cd "$tmp" && unzip -q llvmlite-*.whl && XZ_OPT=-9eT0 tar -cJf "$root/.numba/llvmlite-$LLVMLITE_VERSION.tar.xz" \
    llvmlite llvmlite-*.dist-info)
  rm -rf "$tmp"
fi
cat > .numba/setup.sh <<'SETUP'
# Sourced after .gpu/setup.sh: installs numba and llvmlite into /tmp/site (already on PYTHONPATH).
if [[ ! -d /tmp/site/numba ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .numba/numba-*.whl
  tar -xJf .numba/llvmlite-*.tar.xz -C /tmp/site
fi
SETUP
du -sh .numba
echo "ready: carry .numba plus .gpu without flashinfer-jit.tar.xz (list .gpu's other files), then: source .numba/setup.sh"
