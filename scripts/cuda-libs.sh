# Sourced by the GPU scripts: put NVRTC and NCCL where switchyard's CUDA
# backend finds them at run time.
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
