"""auto's calibration (nnopt.nn.calibrate): a probe on first use per (kind, dtype, tile, shape class), kept on disk
per machine, reused without probing again; NNOPT_AUTO_PROBE=0 falls back to the defaults; backend= still forces."""

import json

import pytest
import torch

from nnopt.nn import calibrate, dispatch
from nnopt.nn.layout import BlockLayout
from tests.conftest import skip_unless_available


@pytest.fixture
def probing(monkeypatch, tmp_path):
    skip_unless_available("cpu", "cpu", "masked_linear")
    monkeypatch.setenv("NNOPT_AUTO_PROBE", "1")
    monkeypatch.setenv("NNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_memory", {})
    monkeypatch.setattr(calibrate, "_loaded", False)
    return tmp_path


def small_layout(keep=0.1):
    mask = (torch.rand(8, 8) < keep).repeat_interleave(32, 0).repeat_interleave(32, 1)  # 256 × 256
    return BlockLayout(mask, 32, 32)


@pytest.mark.parametrize("kind", ["packed", "batch"])
def test_probe_runs_once_is_cached_on_disk_and_reused(probing, monkeypatch, kind):
    layout = small_layout()
    empty, full = calibrate.coefficients(kind, "cpu", torch.float32, layout, m=1)
    assert 0 < empty < 1e3 and 0 < full < 1e3  # timings: their order is not asserted
    data = json.loads((probing / "auto.json").read_text())
    section = data[calibrate.machine_key()]
    assert [k for k in section if k.startswith(kind)] == [f"{kind}|cpu|float32|32x32|2^16|m1"]
    # a new process (memory cleared) reads the file instead of probing
    monkeypatch.setattr(calibrate, "_memory", {})
    monkeypatch.setattr(calibrate, "_loaded", False)
    monkeypatch.setattr(calibrate, "probe", lambda *a, **k: pytest.fail("probed again"))
    assert calibrate.coefficients(kind, "cpu", torch.float32, layout, m=1) == (empty, full)
    speedup = calibrate.predicted_speedup(kind, "cpu", torch.float32, layout, m=1)
    full = max(full, calibrate.MIN_FULL)
    empty = min(empty, full)
    assert speedup == pytest.approx(1 / (empty + layout.block_density * (full - empty)))


def test_shape_classes():
    layout = small_layout()
    assert [calibrate.m_class(m) for m in (1, 2, 16, 17, 64, 65, 4096)] == [1, 16, 16, 64, 64, 256, 256]
    assert calibrate.shape_class("packed", layout, 1) == (16, 1)
    big = BlockLayout(torch.ones(8192, 8192, dtype=torch.bool)[:, :1], 32, 32)
    assert calibrate.shape_class("batch", big, 300)[0] == 16  # 8192 entries: clipped up to the smallest class


def test_probe_off_uses_defaults_and_backend_still_forces(monkeypatch):
    skip_unless_available("cpu", "cpu", "masked_linear")
    monkeypatch.setenv("NNOPT_AUTO_PROBE", "0")
    layout = small_layout(keep=1.0)
    assert calibrate.coefficients("packed", "cpu", torch.float32, layout) == calibrate.DEFAULTS["packed"]
    w = torch.randn(256, 256)
    assert dispatch.choose(layout, 1, w, "cpu", grad_needed=False) is dispatch.PACKED
    assert dispatch.choose(layout, 1, w, "torch", grad_needed=False) is not dispatch.PACKED
