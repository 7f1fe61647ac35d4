# Sourced by the GPU scripts: put NVRTC and NCCL where switchyard's CUDA
# backend finds them at run time, and the CUDA headers NVRTC compiles
# against where CubeCL looks for them.
#
# cudarc loads each library by name (libnvrtc.so or libnvrtc.so.<CUDA
# major>, libnccl.so), NVRTC loads its builtins library from its own
# folder, and NCCL's file is libnccl.so.2, a name cudarc does not try. So
# for the newest copy of each found (the CUDA toolkit's, the system's, or a
# Python package's under $python's site-packages): its folder goes on the
# loader's path, and a link with the unversioned name in a folder of links.
links=$(mktemp -d)
site=$("${python:-python3}" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
for lib in libnvrtc libnccl; do
  # shellcheck disable=SC2086 # $site is a list of folders
  found=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /usr/lib64 $site \
    -name "$lib.so*" ! -name "*builtins*" 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$found" ]; then
    echo "$lib: $found"
    ln -sf "$found" "$links/$lib.so"
    LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
  else
    echo "$lib: not found (needed: libnvrtc always, libnccl for several processes)"
  fi
done
export LD_LIBRARY_PATH="$links:${LD_LIBRARY_PATH:-}"

# CubeCL passes NVRTC the include/ folder of $CUDA_PATH, else of the first of
# /usr/local/cuda, /opt/cuda or (with /usr/bin/nvcc) /usr that exists, and
# switchyard refuses to start where that folder is missing. With CUDA_PATH
# unset and no such folder, CUDA_PATH becomes the folder above the newest
# cuda_bf16.h found (a Python package's include/).
if [ -z "${CUDA_PATH:-}" ]; then
  root=""
  for dir in /usr/local/cuda /opt/cuda; do
    if [ -e "$dir" ]; then root=$dir; break; fi
  done
  if [ -z "$root" ] && [ -e /usr/bin/nvcc ]; then root=/usr; fi
  if [ -z "$root" ] || [ ! -d "$root/include" ]; then
    # shellcheck disable=SC2086 # $site is a list of folders
    header=$(find /usr/local/cuda*/ /usr/include $site -name cuda_bf16.h 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$header" ]; then
      CUDA_PATH=$(dirname "$(dirname "$header")")
      export CUDA_PATH
      echo "CUDA headers: $CUDA_PATH/include"
    else
      echo "CUDA headers: not found (needed: NVRTC compiles the kernels against them; set CUDA_PATH)"
    fi
  fi
fi
