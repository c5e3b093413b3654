#!/usr/bin/env bash
# The GPU suite: one command, ~5 minutes on one GPU, nothing downloaded (random weights).
#
#   bash benchmarks/gpu.sh                      # benchmarks (bench_gpu.py), then the cuda tests
#   bash benchmarks/gpu.sh --device cpu --tiny  # smoke run of the benchmarks on a CPU (tests skip)
#
# PYTHON selects the interpreter (default: python). Arguments go to bench_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
"$PY" benchmarks/bench_gpu.py "$@"
"$PY" -m pytest -q -m cuda tests/test_cuda.py
