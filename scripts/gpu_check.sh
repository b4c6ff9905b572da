#!/usr/bin/env bash
# The one prepared run of issue 6's GPU checks on a lent device machine: from the repository root
# there, with the programs that scripts/gpu_build.sh built and staged on the development machine
# carried in build/gpu/carry (bin/: test_cuda, toy2d, bench_cuda; lib/: the Debian
# libraries they need), it runs, each under its own timeout and within an overall budget (default
# 450 s, GPU_CHECK_BUDGET), going on after any failure:
#   1. every part of the CUDA test program (tests/cuda/test_cuda: host and device checks),
#   2. bench_cuda, all benchmarks, as JSON (fused updates vs copy bandwidth, cuBLAS, the models),
#   3. benchmarks/pytorch_compare_cuda.py: bench_cuda's model and GEMM figures alternating with
#      PyTorch eager on the same GPU (2 rounds), ratios flowdiff / PyTorch,
#   4. toy2d --device cuda on a tiny run (training and sampling on the device),
#   5. compute-sanitizer --tool memcheck on each test part (docs/cuda.md's flags; last, since it
#      is the slowest: it gets what is left of the budget).
# Everything goes to $OUT (at most 8 files come back from the device tool): summary.txt (each
# step's status and time, the device), tests.log (environment, library resolution, the tests),
# bench.json / bench.log, torch.json / torch.log, toy2d.log, sanitizer.log. Without a GPU (as on
# the development machine, where it is tested) every program reports that it skipped, the steps
# that need a GPU are marked skipped, and the summary is still written; OUT defaults to a fresh
# temporary folder there. Exit status: 0 when no step failed or timed out, else 1.
#
# Usage (device tool): command "bash scripts/gpu_check.sh", carry ["build/gpu/carry"],
# timeout_s 540. Variables: OUT, GPU_DIR (default build/gpu/carry), GPU_CHECK_BUDGET (seconds).
set -uo pipefail # not -e: a failing step is recorded and the next one runs
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
gpu_dir=${GPU_DIR:-build/gpu/carry}
budget=${GPU_CHECK_BUDGET:-450}
bin=$gpu_dir/bin
summary=$OUT/summary.txt
tests_log=$OUT/tests.log
t_start=$SECONDS
failures=0
: >"$summary"

note() { printf '%s\n' "$*" | tee -a "$summary"; }

# record NAME STATUS SECONDS
record() {
  printf '%-46s %-28s %5ss\n' "$1" "$2" "$3" | tee -a "$summary"
  case $2 in failed* | "timed out"*) failures=$((failures + 1)) ;; esac
}

# step NAME CAP LOG CMD...: runs CMD with a timeout of min(CAP, what is left of the budget),
# appending its output to LOG; records passed / skipped (exit 77: no GPU) / failed / timed out.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((budget - (SECONDS - t_start)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    record "$name" "not run (budget spent)" 0
    return
  fi
  printf '\n===== %s (timeout %ss): %s\n' "$name" "$limit" "$*" >>"$log"
  local s=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  local status
  case $rc in
    0) status=passed ;;
    77) status="skipped (no GPU)" ;;
    124 | 137) status="timed out (${limit}s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '===== %s: %s\n' "$name" "$status" >>"$log"
  record "$name" "$status" $((SECONDS - s))
}

note "gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${budget}s, programs from $gpu_dir"

if [[ ! -d $bin ]]; then
  note "no $bin: build and stage the programs first (bash scripts/gpu_build.sh) and carry $gpu_dir"
  exit 1
fi

# ---- Libraries: the carried ones first, then the CUDA toolkit's; PyTorch's pip-installed CUDA
# libraries only if the toolkit's are not found.
lib_path=$(cd "$gpu_dir/lib" && pwd)
nvcc_path=$(command -v nvcc || true)
nvcc_root=${nvcc_path:+$(dirname "$(dirname "$nvcc_path")")}
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
  ${nvcc_root:+"$nvcc_root/lib64" "$nvcc_root/lib"}; do
  [[ -d $d && ":$lib_path:" != *":$d:"* ]] && lib_path+=":$d"
done
if LD_LIBRARY_PATH=$lib_path ldd "$bin/bench_cuda" 2>/dev/null | grep -q 'libcublas.*not found'; then
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  if [[ -n $site ]]; then
    while read -r f; do lib_path+=":$(dirname "$f")"; done < <(
      find "$site/nvidia" -maxdepth 4 \( -name 'libcublas.so.*' -o -name 'libcudart.so.*' \) 2>/dev/null |
        sort -u)
  fi
fi
export LD_LIBRARY_PATH=$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

{
  echo "===== environment"
  uname -a
  if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "(no nvidia-smi)"; fi
  nvcc --version 2>&1 | tail -n 2 || true
  command -v compute-sanitizer || echo "(no compute-sanitizer on PATH)"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1 || true
  ldd --version 2>&1 | head -n 1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  for b in "$bin"/*; do
    echo "--- ldd $b"
    ldd "$b" 2>&1
  done
} >>"$tests_log" 2>&1
if grep -q '=> not found' "$tests_log"; then
  note "WARNING: some libraries are not found (tests.log, 'ldd'); the programs that need them fail"
fi

# ---- Is there a GPU? bench_cuda with an empty filter only measures the copy bandwidth, or says
# that it skipped.
probe=$(timeout 60 "$bin/bench_cuda" --benchmark_filter='^$' 2>&1)
probe_rc=$?
if grep -q 'skipped, no CUDA device' <<<"$probe"; then
  gpu=0
  note "no GPU: $(grep -m1 'skipped' <<<"$probe")"
elif ((probe_rc == 0)); then
  gpu=1
  note "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo '?')"
else
  gpu=1 # the device is there but the program failed: the steps below say more
  note "bench_cuda probe failed (exit $probe_rc): $(tail -n 3 <<<"$probe" | tr '\n' ' ')"
fi
echo

# ---- 1. The CUDA tests: each part of test_cuda (test_cuda --list) on its own, as ctest runs them.
parts=()
if [[ -x $bin/test_cuda ]]; then
  while read -r p _; do parts+=("$p"); done < <("$bin/test_cuda" --list)
fi
((${#parts[@]})) || note "no test program (or no parts) in $bin"
for p in "${parts[@]}"; do
  step "test_cuda $p" 90 "$tests_log" env OMP_WAIT_POLICY=PASSIVE "$bin/test_cuda" "$p"
done

# ---- 2. bench_cuda: everything, JSON to bench.json (console errors to bench.log).
if ((gpu)); then
  printf '\n===== bench_cuda\n' >>"$OUT/bench.log"
  # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
  step "bench_cuda (json)" 120 "$OUT/bench.log" \
    bash -c '"$1" --benchmark_format=json --benchmark_min_time=0.3 >"$2"' _ "$bin/bench_cuda" \
    "$OUT/bench.json"
else
  step "bench_cuda (no GPU: says it skipped)" 30 "$OUT/bench.log" "$bin/bench_cuda"
fi

# ---- 3. PyTorch eager on the same GPU against bench_cuda. The script runs bench_cuda through a
# wrapper that sets the library path for it alone, so that PyTorch loads its own libraries.
if ((gpu)); then
  wrapper=$(mktemp /tmp/bench_cuda.XXXXXX)
  printf '#!/bin/bash\nLD_LIBRARY_PATH=%q exec %q "$@"\n' "$LD_LIBRARY_PATH" \
    "$(cd "$bin" && pwd)/bench_cuda" >"$wrapper"
  chmod +x "$wrapper"
  step "pytorch_compare_cuda.py (2 rounds)" 180 "$OUT/torch.log" \
    env -u LD_LIBRARY_PATH PYTHONUNBUFFERED=1 python3 benchmarks/pytorch_compare_cuda.py \
    --bench "$wrapper" --rounds 2 --min-time 0.3 --json "$OUT/torch.json"
else
  record "pytorch_compare_cuda.py" "skipped (no GPU)" 0
  env -u LD_LIBRARY_PATH python3 benchmarks/pytorch_compare_cuda.py --dry-run \
    --bench "$bin/bench_cuda" >>"$OUT/torch.log" 2>&1 || true
fi

# ---- 4. toy2d on the device, tiny (its pictures go to /tmp: only 8 files come back). Without a
# GPU it says so in one line and runs on the CPU.
toy2d_name="toy2d --device cuda (tiny)"
((gpu)) || toy2d_name="toy2d --device cuda (no GPU: on the CPU)"
step "$toy2d_name" 60 "$OUT/toy2d.log" \
  env OMP_WAIT_POLICY=PASSIVE "$bin/toy2d" --device cuda --dist moons --train-steps 200 \
  --batch 256 --n 500 --steps 10 --out /tmp/gpu_check_toy2d

# ---- 5. compute-sanitizer memcheck on each test part. --report-api-errors no: the backend part
# provokes two CUDA API errors on purpose (docs/cuda.md); memory errors make the exit code 99.
if ((gpu)) && command -v compute-sanitizer >/dev/null; then
  for p in "${parts[@]}"; do
    step "memcheck test_cuda $p" 150 "$OUT/sanitizer.log" \
      env OMP_WAIT_POLICY=PASSIVE compute-sanitizer --tool memcheck --report-api-errors no \
      --error-exitcode 99 "$bin/test_cuda" "$p"
  done
elif ((gpu)); then
  record "compute-sanitizer" "failed (not on PATH)" 0
else
  record "compute-sanitizer memcheck" "skipped (no GPU)" 0
fi

# ---- Summary: bench_cuda's figures in short, the comparison table, the sanitizer's verdicts.
{
  echo
  if [[ -s $OUT/bench.json ]]; then
    env -u LD_LIBRARY_PATH python3 - "$OUT/bench.json" <<'PY' || echo "(bench.json unreadable)"
import json, sys
doc = json.load(open(sys.argv[1]))
print("bench_cuda on", doc.get("context", {}).get("gpu", "?"))
keys = ("of_copy", "bytes_per_second", "GFLOP/s", "steps_per_s", "samples_per_s", "nfe_per_s")
for b in doc.get("benchmarks", []):
    if b.get("error_occurred"):
        print(f"  {b['name']}: ERROR {b.get('error_message', '')}")
        continue
    c = [f"{k} {b[k]:.4g}" for k in keys if k in b]
    print(f"  {b['name']}: {b['real_time']:.4g} {b['time_unit']}; " + ", ".join(c))
PY
  fi
  if [[ -s $OUT/torch.log ]] && grep -q '^| figure' "$OUT/torch.log"; then
    sed -n '/^Rates, median/,/^$/p; /^| /p' "$OUT/torch.log" | awk '!seen[$0]++'
  fi
  [[ -s $OUT/sanitizer.log ]] && grep -E '^===== memcheck test_cuda [A-Za-z0-9_]+: |ERROR SUMMARY' "$OUT/sanitizer.log"
  echo
  echo "total $((SECONDS - t_start))s of ${budget}s; $failures step(s) failed or timed out; files in $OUT:"
  ls "$OUT"
} >>"$summary" 2>&1
printf '\n===== summary (%s)\n' "$summary"
cat "$summary"
((failures == 0))
