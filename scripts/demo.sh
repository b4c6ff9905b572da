#!/usr/bin/env bash
# scripts/demo.sh — the README's first command: installs what is missing (scripts/setup.sh), builds
# the guided-sampling demo with the `release` preset and runs it, writing pictures to
# out/gmm_guidance/. Run from anywhere; paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=gmm_guidance
out=out/$target

bash scripts/setup.sh
cmake --preset release >/dev/null
if ! cmake --build --preset release --target help | grep -Eq "^(\.\.\. )?$target(:| |$)"; then
  echo "demo.sh: the build has no '$target' target yet (examples/$target.cpp is still to come);" >&2
  echo "demo.sh: the library is configured in build/release, nothing to run." >&2
  exit 1
fi
cmake --build --preset release --target "$target"

mkdir -p "$out"
"build/release/examples/$target" --out "$out"

echo
echo "demo.sh: pictures written to $(pwd)/$out/:"
find "$out" -maxdepth 1 -type f \( -name '*.png' -o -name '*.pgm' -o -name '*.svg' \) -printf '  %f\n' |
  sort
