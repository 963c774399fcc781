"""tests/nn: auto's cost model from its built-in defaults (no timing probe, no cache file), so which path auto takes
is the same on every machine; tests/nn/test_calibrate.py exercises the probe itself."""

import pytest


@pytest.fixture(autouse=True)
def _no_auto_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("NNOPT_AUTO_PROBE", "0")
    monkeypatch.setenv("NNOPT_CACHE_DIR", str(tmp_path / "nnopt-cache"))
