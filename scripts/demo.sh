#!/usr/bin/env bash
# scripts/demo.sh — the README's first command: installs what is missing (scripts/setup.sh), builds
# the demos with the `release` preset and runs them with their defaults:
#   gmm_guidance  CFG on the exact field of a labelled Gaussian mixture       (seconds)
#   toy2d         flow and score matching on five labelled 2D distributions   (a few minutes)
#   fashion_cfg   a class-conditional U-Net on Fashion-MNIST with CFG         (about 15 minutes)
# Pictures go to out/<demo>/. fashion_cfg checkpoints to out/fashion_cfg/ and resumes from there,
# so running the demo again skips the training it has already done.
#   bash scripts/demo.sh              all three
#   bash scripts/demo.sh toy2d        only the named demos (also fashion_dit, fashion_latent:
#                                     an estimated 16 minutes each on idle cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

demos=("$@")
[[ ${#demos[@]} -eq 0 ]] && demos=(gmm_guidance toy2d fashion_cfg)
for d in "${demos[@]}"; do
  case "$d" in
    gmm_guidance | toy2d | fashion_cfg | fashion_dit | fashion_latent) ;;
    -h | --help)
      sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "demo.sh: unknown demo '$d' (gmm_guidance, toy2d, fashion_cfg, fashion_dit or fashion_latent)" >&2
      exit 2
      ;;
  esac
done

bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target "${demos[@]}"

for d in "${demos[@]}"; do
  echo
  echo "=== demo.sh: $d"
  start=$SECONDS
  "build/release/examples/$d" --out "out/$d"
  echo "=== demo.sh: $d took $((SECONDS - start)) s"
done

echo
echo "demo.sh: pictures written to:"
for d in "${demos[@]}"; do
  find "out/$d" -maxdepth 1 -type f -name '*.png' -printf "  $(pwd)/out/$d/%f\n" | sort
done
