#!/usr/bin/env bash
# On a GPU machine: build with CUDA, MPI and NCCL (offline), then train the
# default model for a few steps on CUDA under mpirun, one rank per GPU (at
# least one). The NCCL bootstrap checks an all-reduce before training; the
# run's metrics show comm/allreduce_bytes when there are two ranks or more.
#
# Needs Open MPI and libclang on the build machine and Open MPI on the GPU
# machine (the binary links libmpi).
#
#   scripts/gpu-nccl-check.sh [RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-1}
# SKIP_BUILD=1: use the target/release/switchyard already built with
# FEATURES=cuda,mpi (carried to the GPU machine).
if [ -z "${SKIP_BUILD:-}" ]; then
  FEATURES=cuda,mpi scripts/build-cuda-offline.sh
fi
# shellcheck source=scripts/cuda-libs.sh
. scripts/cuda-libs.sh
out=${OUT:-/tmp}/nccl-check
rm -rf "$out"
mpirun --allow-run-as-root --oversubscribe -np "$ranks" ./target/release/switchyard train \
  --config configs/tiny.toml --device cuda --runs-dir "$out" --name check \
  --set train.steps=20 --set train.eval_every=10 --set log.progress='"lines"'
grep -o '"comm/allreduce_bytes":[0-9.e+]*' "$out/check/metrics.jsonl" | tail -n 1 || true
echo "nccl check: $ranks rank(s) trained 20 steps on CUDA"
