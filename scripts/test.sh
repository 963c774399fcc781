#!/usr/bin/env bash
# The test command of the README: installs torch (CPU wheel pinned), triton, pytest, scikit-learn, matplotlib and nnopt
# (building nnopt._C), then runs the whole suite. pytest's exit 5 (no tests collected) counts as failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "torch==2.13.0" triton pytest scikit-learn numpy matplotlib ninja setuptools wheel transformers expecttest
# transformers depends on torch: re-pin so pip never swaps the CPU wheel for another build
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m nnopt info
set +e
"$PY" -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
