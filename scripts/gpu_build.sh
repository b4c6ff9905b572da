#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), the CUDA programs a lent GPU machine runs, and stages
# them for the device tool's `carry`: the CUDA test program (tests/cuda/test_cuda), toy2d (its
# nvcc build) and bench_cuda, configured by the `gpu` preset (Release, warnings are errors, sm_90) in build/gpu
# and built as named targets only. The GPU machine has nvcc, CUDA 13's libraries, PyTorch and
# compute-sanitizer but not this machine's Debian libraries (Google Benchmark, OpenMP, OpenBLAS,
# zlib, ...), so the programs are copied, stripped, into build/gpu/carry/bin and every shared
# library they load from outside glibc, the C++ runtime and the CUDA toolkit into
# build/gpu/carry/lib (the programs' RPATH is $ORIGIN/../lib; scripts/gpu_check.sh also puts it
# on LD_LIBRARY_PATH for the libraries' own dependencies). It prints the carried size (the tool
# takes at most 64 MiB with the working tree) and the exact device-tool call that runs
# scripts/gpu_check.sh there.
#
# Usage: bash scripts/gpu_build.sh          (JOBS=N for more than 2 parallel compilations)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=${JOBS:-2}
build=build/gpu
stage=$build/carry

if ! command -v nvcc >/dev/null && [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "gpu_build.sh: no nvcc (CUDA toolkit) on this machine; the CUDA programs cannot be built" >&2
  exit 1
fi

echo "== configure ($build, preset gpu)"
cmake --preset gpu >"$build.configure.log" 2>&1 || {
  cat "$build.configure.log" >&2
  exit 1
}
grep -q 'CUDA checks enabled' "$build.configure.log" || {
  echo "gpu_build.sh: the configure did not enable the CUDA programs (see $build.configure.log)" >&2
  exit 1
}

# The targets: the CUDA test program (tests/cuda/test_cuda.cu, all six parts), toy2d (compiled by
# nvcc) and bench_cuda.
targets=(test_cuda toy2d bench_cuda)
echo "== build: ${targets[*]} (-j$jobs)"
time ninja -C "$build" -j"$jobs" "${targets[@]}"

echo "== stage $stage"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/lib"
for t in "${targets[@]}"; do
  f=$(find "$build" -path "$stage" -prune -o -type f -name "$t" -perm -u+x -print | head -n 1)
  [[ -n $f ]] || {
    echo "gpu_build.sh: built target $t not found under $build" >&2
    exit 1
  }
  # Stripping removes the symbol tables only; the device code (the fatbin) is data and stays.
  strip --strip-unneeded -o "$stage/bin/$t" "$f"
done

# Shared libraries to carry: all that the programs resolve here, except glibc's own, the C++ and
# GCC runtimes (the device image's are as new or newer) and CUDA's (the device has CUDA 13, and
# cuBLAS alone is several hundred MiB). ldd lists the transitive closure.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libstdc\+\+\.so|libgcc_s\.so|libcuda\.so|libcudart\.so|libcublas\.so|libcublasLt\.so)'
for b in "$stage"/bin/*; do
  if ldd "$b" | grep -q 'not found'; then
    echo "gpu_build.sh: $b has unresolved libraries here:" >&2
    ldd "$b" | grep 'not found' >&2
    exit 1
  fi
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ ! $name =~ $skip ]]; then
    cp -L "$path" "$stage/lib/$name"
    strip --strip-unneeded "$stage/lib/$name" 2>/dev/null || true
  fi
done

# glibc and libstdc++ (not carried): the device's must be at least the newest versions the
# programs reference (an Ubuntu 22.04 or newer image has both).
symbols=$(for b in "$stage"/bin/* "$stage"/lib/*; do objdump -T "$b" 2>/dev/null; done)
glibc=$(grep -o 'GLIBC_[0-9.]*' <<<"$symbols" | sort -V -u | tail -n 1)
glibcxx=$(grep -o 'GLIBCXX_[0-9.]*' <<<"$symbols" | sort -V -u | tail -n 1)
size_kib=$(du -sk "$stage" | cut -f1)
echo
echo "staged programs:"
du -h "$stage"/bin/*
echo "carried libraries: $(find "$stage/lib" -type f -printf '%f ')"
echo "newest symbol versions needed from the device: ${glibc:-no GLIBC}, ${glibcxx:-no GLIBCXX}"
echo "carried size: $((size_kib / 1024)) MiB ($size_kib KiB) of the tool's 64 MiB (with the working tree)"
if ((size_kib > 56 * 1024)); then
  echo "gpu_build.sh: WARNING: the carried folder leaves little room for the working tree" >&2
fi
cat <<EOF

Device-tool call (one run; gpu_check.sh keeps to a 450 s budget, timeout_s leaves room):
  command:   bash scripts/gpu_check.sh
  carry:     ["$stage"]
  timeout_s: 540
(it writes summary.txt, tests.log, sanitizer.log, toy2d.log, bench.json, bench.log, torch.json
and torch.log to \$OUT; see benchmarks/README.md, "CUDA (not yet run on a GPU)".)
EOF
