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
# The browser tests (marker `browser`) open the written HTML reports in Debian's Chromium through
# Playwright's Python package (installed by the test extra; its own browser download is never
# used). Install Chromium where it is missing and apt is available; elsewhere those tests skip
# and say why.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || echo "run-tests: could not install chromium; the browser tests will be skipped" >&2
  else
    echo "run-tests: no chromium and no apt-get as root; the browser tests will be skipped" >&2
  fi
fi
exec "$VENV/bin/python" -m pytest -q "$@"
