"""The backend registry: precedence (argument > use_backend > NNOPT_BACKEND > auto) and the missing sentences."""

import pytest
import torch

import nnopt
from nnopt import backends


def test_precedence(monkeypatch):
    monkeypatch.delenv("NNOPT_BACKEND", raising=False)
    assert backends.requested() == "auto"
    monkeypatch.setenv("NNOPT_BACKEND", "torch")
    assert backends.requested() == "torch"
    with nnopt.use_backend("cpu"):
        assert backends.requested() == "cpu"
        assert backends.requested("triton") == "triton"
        with nnopt.use_backend("auto"):
            assert backends.requested() == "auto"
        assert backends.requested() == "cpu"
    assert backends.requested() == "torch"


def test_unknown_names_raise(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with nnopt.use_backend("tpu"):
            pass
    monkeypatch.setenv("NNOPT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="NNOPT_BACKEND: unknown backend 'gpu'"):
        backends.requested()


def test_auto_resolves_to_an_available_backend():
    name = backends.resolve("fused_optim", "auto", "cpu")
    assert backends.missing(name, "cpu") is None
    assert backends.missing("torch", "cpu") is None


def test_forced_backend_error_is_the_missing_sentence():
    why = backends.missing("cuda", "cpu")
    assert why == "backend 'cuda' needs CUDA tensors, got cpu tensors"
    with pytest.raises(nnopt.BackendUnavailable) as e:
        backends.resolve("fused_optim", "cuda", "cpu")
    assert why in str(e.value) and "'cuda'" in str(e.value)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backends.missing("triton", "cpu")


def test_availability_rows_cover_every_backend():
    rows = backends.availability("cpu")
    assert [b for b, _ in rows] == list(backends.BACKENDS)
    assert dict(rows)["torch"] is None
    if not torch.cuda.is_available():
        assert dict(backends.availability("cuda"))["cuda"] == "backend 'cuda' needs a CUDA device, and torch sees none"
