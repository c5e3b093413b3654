#!/usr/bin/env bash
# Set up the environment (venv, packages, an offline ComfyUI for the node-pack tests) and run
# the whole test suite. Extra arguments go to pytest (e.g. -m "not slow" for the fast subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV="${NEARID_VENV:-.venv}"
if [ -f scripts/setup_comfyui.py ]; then
  "$VENV/bin/python" scripts/setup_comfyui.py
fi
exec "$VENV/bin/python" -m pytest -q "$@"
