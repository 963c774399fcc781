"""The backend registry: which implementation of an op family runs, and why another cannot.

Backends: ``triton`` (nnopt.kernels), ``cuda`` and ``cpu`` (the extension nnopt._C; PyTorch's dispatcher sends
CUDA tensors to csrc/cuda and CPU tensors to csrc/cpu), ``torch`` (nnopt.reference, always available) and
``auto``. Precedence: a ``backend=`` argument, then ``use_backend(...)``, then ``NNOPT_BACKEND``, then ``auto``.

``missing(backend, device)`` owns every availability rule: it returns None or the one sentence that is the
error of a forced backend, the pytest skip reason and the row of ``python -m nnopt info``.
"""

import contextlib
import contextvars
import importlib
import importlib.util
import os

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
CHOICES = BACKENDS + ("auto",)

# auto's order per family and device type, fastest first, from the measurements in bench/RESULTS.md.
AUTO_ORDER = {
    "fused_optim": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    "select": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    "masked_linear": {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
    "distill_loss": {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
    "oneshot": {"cpu": ("cpu", "torch"), "cuda": ("torch",)},
    # quant_optim on CUDA: Triton first (its logic is interpreter-tested here; the .cu is compile-checked only)
    "quant_optim": {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")},
}

# Families whose GPU kernels are Triton only (cuBLAS-class dense tiles are Triton's strength).
_NO_CUDA_KERNELS = {"masked_linear", "distill_loss", "oneshot"}
# Families with no Triton kernels: SparseGPT's column loop is sequential per row, a poor fit for Triton tiles, and
# on GPU torch's batched ops already keep the device busy.
_NO_TRITON_KERNELS = {"oneshot"}

_current = contextvars.ContextVar("nnopt_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says what is missing."""


def _check_name(name, what):
    if name not in CHOICES:
        raise ValueError(f"{what}: unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Runs the block with ``name`` as the default backend: ``with nnopt.use_backend("triton"): opt.step()``."""
    token = _current.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _current.reset(token)


def requested(backend=None):
    """The backend asked for, by precedence: argument, use_backend block, NNOPT_BACKEND, else "auto"."""
    if backend is not None:
        return _check_name(backend, "backend=")
    if _current.get() is not None:
        return _current.get()
    env = os.environ.get("NNOPT_BACKEND")
    if env:
        return _check_name(env, "NNOPT_BACKEND")
    return "auto"


def _device_type(device):
    return torch.device(device).type if device is not None else "cpu"


def triton_missing():
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    return None


def missing(backend, device="cpu", family="fused_optim"):
    """None when ``backend`` can run ``family`` on tensors of ``device``; else one sentence saying what is missing."""
    dev = _device_type(device)
    if backend == "torch":
        return None
    if backend == "cpu":
        if dev != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got {dev} tensors"
        from nnopt import _ext

        why = _ext.load()
        if why is None and not _ext.has_kernel(_ext.op_name(family), "CPU"):
            return "nnopt._C was built without its CPU kernels; rebuild with `pip install --no-build-isolation -e .`"
        return why
    if backend == "cuda":
        if dev != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {dev} tensors"
        if not torch.cuda.is_available():
            return "backend 'cuda' needs a CUDA device, and torch sees none"
        from nnopt import _ext

        why = _ext.load()
        if why is not None:
            return why
        if family in _NO_CUDA_KERNELS:
            gpu = "'torch'" if family in _NO_TRITON_KERNELS else "'triton'"
            return f"the {family} family has no CUDA C++ kernels; its GPU backend is {gpu}"
        if not _ext.has_kernel(_ext.op_name(family), "CUDA"):
            return "nnopt._C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)"
        return None
    if backend == "triton":
        if family in _NO_TRITON_KERNELS:
            return f"the {family} family has no Triton kernels; its backends are 'cpu' and 'torch'"
        why = triton_missing()
        if why is not None:
            return why
        if dev == "cuda":
            return None if torch.cuda.is_available() else "backend 'triton' needs a CUDA device, and torch sees none"
        if dev == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "backend 'triton' on CPU tensors needs Triton's interpreter (set TRITON_INTERPRET=1 before start)"
        return f"backend 'triton' does not run on {dev} tensors"
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(CHOICES)}")


def resolve(family, backend=None, device="cpu"):
    """The concrete backend name for this call; raises BackendUnavailable for a forced backend that cannot run."""
    name = requested(backend)
    dev = _device_type(device)
    if name == "auto":
        for candidate in AUTO_ORDER[family].get(dev, ("torch",)):
            if missing(candidate, dev, family) is None:
                return candidate
        return "torch"
    why = missing(name, dev, family)
    if why is not None:
        raise BackendUnavailable(f"nnopt backend {name!r} is unavailable: {why}")
    return name


def implementation(family, name):
    """The namespace holding ``family``'s functions for the concrete backend ``name``."""
    if name == "torch":
        return importlib.import_module(f"nnopt.reference.{family}")
    if name == "triton":
        return importlib.import_module(f"nnopt.kernels.{family}")
    from nnopt import _ext

    return _ext.namespace(family)


def availability(device="cpu", family="fused_optim"):
    """[(backend, None or reason)] for every backend on ``device``: the rows of `python -m nnopt info`."""
    return [(b, missing(b, device, family)) for b in BACKENDS]
