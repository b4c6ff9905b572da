#!/usr/bin/env bash
# tools/make_fixtures.sh — regenerates every PyTorch reference fixture in tests/fixtures/ by
# running each tools/fixtures/*.py (except the st.py helper) with Debian's python3-torch
# (/usr/bin/python3; `bash scripts/setup.sh --with-torch` installs it). CI never runs this: it only
# reads the committed fixtures. Scripts are seeded, so reruns give the same files.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=/usr/bin/python3
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "make_fixtures: $py cannot import torch; run: bash scripts/setup.sh --with-torch" >&2
  exit 1
fi
mkdir -p tests/fixtures
for script in tools/fixtures/*.py; do
  [[ "$(basename "$script")" == st.py ]] && continue
  echo "make_fixtures: $script"
  PYTHONPATH=tools/fixtures "$py" "$script" tests/fixtures
done
echo "make_fixtures: fixtures in tests/fixtures/"
