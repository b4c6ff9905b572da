#!/usr/bin/env bash
# scripts/setup.sh — installs the Debian packages flowdiff needs to build, test and run its demos.
# Idempotent and quiet when everything is present: each package is checked with dpkg-query, and
# apt-get (update + install) runs only for the missing ones, as root or through sudo.
#
#   bash scripts/setup.sh                # build/test dependencies
#   bash scripts/setup.sh --with-torch   # also python3-torch (only to regenerate PyTorch fixtures)
#
# The CUDA toolkit is not a Debian package here: when /usr/local/cuda (nvcc) exists, the build
# uses it; without it everything but flowdiff::cuda and the CUDA checks still builds and tests.
set -euo pipefail

packages=(
  cmake g++ make ninja-build pkg-config
  libeigen3-dev catch2 libbenchmark-dev zlib1g-dev libstb-dev
  libopenblas0-openmp libopenblas-dev   # the OpenMP OpenBLAS shares libgomp's threads (DESIGN.md §7)
  dataset-fashion-mnist
)

for arg in "$@"; do
  case "$arg" in
    --with-torch) packages+=(python3-torch python3-numpy) ;;
    -h | --help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup.sh: unknown option '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "setup.sh: not a Debian-based system (no dpkg-query); install the equivalents of:" >&2
  echo "  ${packages[*]}" >&2
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != "installed" ]]; then
    missing+=("$p")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "setup.sh: these packages are missing: ${missing[*]}" >&2
  echo "setup.sh: installing them needs root, and sudo is not available; run as root:" >&2
  echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup.sh: done"
