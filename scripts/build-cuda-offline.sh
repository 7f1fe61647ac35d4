#!/usr/bin/env bash
# Build `switchyard` with the CUDA backend on a machine that cannot download
# LLVM.
#
# Burn's CUDA backend (cubecl-cuda) always links an LLVM-based PTX compiler
# beside the NVRTC one, and the build script of its LLVM bundle downloads a
# prebuilt LLVM. switchyard selects NVRTC (the `cpp` feature of cubecl-cuda,
# turned on by our `cuda` feature), so LLVM is never called at run time.
# This script builds without the download (DOCS_RS=1 makes those two build
# scripts skip it) and links stubs in place of the LLVM symbols; a stub that
# is somehow called aborts with a message instead of misbehaving.
#
# Needs: a Rust toolchain, gcc, nm, strip and xz. Does not need the CUDA
# toolkit; running the binary needs the NVIDIA driver and NVRTC (libnvrtc)
# on the GPU machine.
#
#   scripts/build-cuda-offline.sh            # → target/release/switchyard
#   FEATURES=cuda,mpi scripts/build-cuda-offline.sh   # with MPI and NCCL
#
# It also writes target/switchyard-cuda.xz, the binary stripped and
# compressed (about 19 MB, where the binary is about 140 MB) for copying to
# a GPU machine; scripts/gpu-bench.sh unpacks it there. PACK=0 skips it.
set -euo pipefail
features=${FEATURES:-cuda}
cd "$(dirname "$0")/.."
export DOCS_RS=1
# The CUDA API that cudarc binds, as major0minor0. With no toolkit here it
# would bind the newest it knows (13.4); 13.0 is what an R580 driver (CUDA
# 13.0) provides, and newer drivers run it too. Set it to the CUDA version
# of the oldest driver the binary is for (for example 12080 for 12.8).
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
stub_dir=target/cuda-offline
mkdir -p "$stub_dir"

# 1. Link once leaving LLVM's symbols undefined, to learn which they are.
cargo rustc --release --features "$features" --bin switchyard -- \
  -C link-arg=-Wl,--unresolved-symbols=ignore-all
nm -D --undefined-only target/release/switchyard | awk '{print $2}' | grep -v '@' |
  grep -E '^(LLVM|cubecl_|_ZN4llvm|lld)' | sort -u >"$stub_dir/symbols.txt"

# 2. One aborting stub per symbol.
{
  echo '#include <stdio.h>'
  echo '#include <stdlib.h>'
  echo 'static void llvm_missing(const char *name) {'
  echo '  fprintf(stderr, "switchyard: %s called, but this CUDA build has no LLVM (NVRTC only)\n", name);'
  echo '  abort();'
  echo '}'
  while read -r sym; do
    echo "void $sym(void) { llvm_missing(\"$sym\"); }"
  done <"$stub_dir/symbols.txt"
} >"$stub_dir/llvm_stubs.c"
gcc -O1 -fPIC -c "$stub_dir/llvm_stubs.c" -o "$stub_dir/llvm_stubs.o"

# 3. Link again against the stubs: no undefined symbols remain.
touch src/main.rs
cargo rustc --release --features "$features" --bin switchyard -- \
  -C link-arg="$PWD/$stub_dir/llvm_stubs.o"
echo "built target/release/switchyard with features $features ($(wc -l <"$stub_dir/symbols.txt") LLVM symbols stubbed)"

# 4. A copy small enough to send: symbols stripped, xz-compressed.
if [ "${PACK:-1}" != 0 ]; then
  strip -o "$stub_dir/switchyard" target/release/switchyard
  xz -T0 -6 -c "$stub_dir/switchyard" >target/switchyard-cuda.xz.tmp
  mv target/switchyard-cuda.xz.tmp target/switchyard-cuda.xz
  rm -f "$stub_dir/switchyard"
  echo "packed target/switchyard-cuda.xz ($(du -h target/switchyard-cuda.xz | cut -f1)): copy it to the GPU machine; scripts/gpu-bench.sh unpacks it"
fi
