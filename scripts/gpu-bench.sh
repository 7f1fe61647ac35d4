#!/usr/bin/env bash
# On a GPU machine, in one call: say which card, driver and commit, make
# NVRTC findable, then run bench/compare_gpu.py (switchyard in bf16 and f32,
# with its kernels and on the composed path, PyTorch eager beside it, the
# dense twin, the fused SwiGLU, and the per-operation table) with a time
# budget, saving each run's report under $OUT as soon as it finishes.
#
# Build here first (no GPU needed), then bring the packed binary along
# (about 19 MB; the binary itself is about 140 MB), which this unpacks:
#
#   scripts/build-cuda-offline.sh     # → target/release/switchyard, target/switchyard-cuda.xz
#   COMMIT=$(git rev-parse HEAD) scripts/gpu-bench.sh [compare_gpu.py flags]
#
# BUDGET_S (default 300): no run starts after this many seconds, so the
# tables come out before a lease ends; PYTHON (default python3): a Python
# with torch and transformers.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/switchyard-gpu}
mkdir -p "$out"
python=${PYTHON:-python3}
bin=target/release/switchyard
packed=target/switchyard-cuda.xz
# The packed binary (scripts/build-cuda-offline.sh), when it is what was
# brought along or is newer than the binary here.
if [ -f "$packed" ] && { [ ! -x "$bin" ] || [ "$packed" -nt "$bin" ]; }; then
  mkdir -p "$(dirname "$bin")"
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$packed" >"$bin.tmp"
  else
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$packed" "$bin.tmp"
  fi && chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin" || {
    echo "could not unpack $packed" >&2
    exit 2
  }
  echo "unpacked $packed"
fi
if [ ! -x "$bin" ]; then
  echo "no $bin: build it with scripts/build-cuda-offline.sh and bring it along (or $packed)" >&2
  exit 2
fi

{
  echo "date:   $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "card:   $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
} | tee "$out/machine.txt"

# Each run is a new process: CubeCL's compilation cache (under
# target/environment, beside its autotune results) lets a run reuse the
# kernels NVRTC compiled for an earlier one instead of compiling them again.
if [ ! -e cubecl.toml ]; then
  printf '[compilation]\ncache = true\n' >cubecl.toml
  trap 'rm -f cubecl.toml' EXIT
fi

# shellcheck source=scripts/cuda-libs.sh
. scripts/cuda-libs.sh

"$python" bench/compare_gpu.py --python "$python" --out "$out/compare-gpu" \
  --budget-s "${BUDGET_S:-300}" --dense "$@"
