#!/usr/bin/env bash
# The main job of the README: installs nnopt and its demo needs, then runs `nnopt demo` (pass --quick for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "torch==2.13.0" triton scikit-learn numpy matplotlib ninja setuptools wheel
# transformers builds the LM story's model; without it (e.g. no package index) the story uses nnopt's own model
"$PY" -m pip install -q transformers || echo "transformers did not install: the LM story uses nnopt's own model" >&2
# transformers depends on torch: re-pin so pip never swaps the CPU wheel for another build
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m nnopt demo "$@"
