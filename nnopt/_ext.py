"""Loads the C++/CUDA extension nnopt._C on first use and registers the fake kernels that torch.compile traces.

Nothing here runs at `import nnopt`: the extension is loaded by `load()` (called by the backend registry).
"""

import functools
import types

import torch

# Every op's name in the `nnopt` library, by family; the schemas live in csrc/ops.cpp.
OPS = {
    "fused_optim": ("sgd_step", "adam_step", "adagrad_step", "rmsprop_step"),
    "select": ("select_histogram",),
}


@functools.lru_cache(maxsize=None)
def load():
    """Imports nnopt._C. Returns None on success, else the sentence saying why it is unavailable."""
    try:
        from nnopt import _C  # noqa: F401
    except ImportError as e:
        return f"the C++ extension nnopt._C is not built ({e}); run `pip install --no-build-isolation -e .`"
    _register_fakes()
    return None


def has_kernel(op, dispatch_key):
    """True when nnopt::<op> has an implementation for dispatch_key ("CPU" or "CUDA")."""
    if load() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nnopt::{op}", dispatch_key)


def _register_fakes():
    # The fused optimizer steps mutate their inputs and return nothing: their fake kernels do nothing.
    for name in OPS["fused_optim"]:
        torch.library.register_fake(f"nnopt::{name}_")(_noop)
    # The select histogram adds into its `hist` argument in place and returns nothing.
    torch.library.register_fake("nnopt::select_histogram_")(_noop)


def _noop(*args, **kwargs):
    return None


@functools.lru_cache(maxsize=None)
def namespace(family):
    """The family's functions, with the same names and signatures as nnopt.reference.<family>, calling nnopt._C."""
    ops = {}
    for name in OPS[family]:
        ops[name] = getattr(torch.ops.nnopt, f"{name}_")
    return types.SimpleNamespace(**ops)
