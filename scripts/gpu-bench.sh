#!/usr/bin/env bash
# On a GPU machine, in one call: say which card, driver and commit, make
# NVRTC findable, then run bench/compare_gpu.py (switchyard in bf16 and f32,
# with its kernels and on the composed path, PyTorch eager beside it, the
# dense twin, and the per-operation table) with a time budget, saving each
# run's report under $OUT as soon as it finishes.
#
# Build here first (no GPU needed), then carry the binary:
#
#   scripts/build-cuda-offline.sh                 # → target/release/switchyard
#   COMMIT=$(git rev-parse HEAD) scripts/gpu-bench.sh [compare_gpu.py flags]
#
# BUDGET_S (default 300): no run starts after this many seconds, so the
# tables come out before a lease ends; PYTHON (default python3): a Python
# with torch and transformers.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/switchyard-gpu}
mkdir -p "$out"
bin=target/release/switchyard
if [ ! -x "$bin" ]; then
  echo "no $bin: build it with scripts/build-cuda-offline.sh and bring it along" >&2
  exit 2
fi

{
  echo "date:   $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "card:   $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
} | tee "$out/machine.txt"

python=${PYTHON:-python3}
# shellcheck source=scripts/cuda-libs.sh
. scripts/cuda-libs.sh

"$python" bench/compare_gpu.py --python "$python" --out "$out/compare-gpu" \
  --budget-s "${BUDGET_S:-300}" --dense "$@"
