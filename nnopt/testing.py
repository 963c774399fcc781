"""Shared test utilities: the one tolerance table, shapes, and backend parametrization helpers.

Tolerances are torch's defaults per dtype (torch.testing.assert_close), with float32 tightened to the
~1e-6 relative bar nnopt promises for elementwise kernels; reductions add ``atol`` proportional to
their length. Tests use these, never their own magic numbers.
"""

import torch

from nnopt import backends

# (rtol, atol) per dtype for elementwise results over a few steps.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}
TOLERANCES[torch.complex64] = TOLERANCES[torch.float32]
TOLERANCES[torch.complex128] = TOLERANCES[torch.float64]

# Sizes every op family is tested on: a scalar, 1, a power of two, a power of two + 17, an odd large size.
SIZES_QUICK = [(), (1,), (17,), (64,), (64 + 17,), (7, 13)]
SIZES_FULL = SIZES_QUICK + [(278011,)]


def tolerance(dtype, reduction_length=1):
    """(rtol, atol) for results of ``dtype``; atol grows with the length of any reduction."""
    rtol, atol = TOLERANCES[dtype]
    return rtol, atol * max(1, reduction_length) ** 0.5


def assert_close(actual, expected, dtype=None, reduction_length=1, msg=""):
    """assert_close with nnopt's tolerance for ``dtype`` (default: expected's dtype); compares in expected's dtype.

    atol is relative to the tensor's scale (its largest magnitude, at least 1): an entry that is small only
    because larger terms cancelled (a momentum buffer, a centered second moment) carries their rounding error.
    """
    dtype = dtype or expected.dtype
    rtol, atol = tolerance(dtype, reduction_length)
    if expected.numel() and (expected.is_floating_point() or expected.is_complex()):
        atol *= max(1.0, float(expected.detach().abs().max().nan_to_num(0.0)))
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=msg or None)


def available_backends(device, family="fused_optim"):
    """The backends that can run ``family`` on ``device`` here."""
    return [b for b in backends.BACKENDS if backends.missing(b, device, family) is None]
