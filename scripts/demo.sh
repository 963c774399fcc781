#!/usr/bin/env bash
# The main job of the README: installs nnopt and its demo needs, then runs `nnopt demo` (pass --quick for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "torch==2.13.0" triton scikit-learn numpy matplotlib ninja setuptools wheel
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m nnopt demo "$@"
