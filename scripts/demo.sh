#!/usr/bin/env bash
# Set up the environment and run the end-to-end demo (`nearid demo`); arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV="${NEARID_VENV:-.venv}"
exec "$VENV/bin/nearid" demo "$@"
