"""torch.optim's argument checks, with its messages, for the optimizers added after the first five."""

import torch

from nnopt.optim._fused import _as_float, check_nonneg


def check_lr(lr):
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    check_nonneg(lr, "learning rate")


def check_betas(betas, n=2):
    """Each beta in [0, 1), as torch.optim's Adam family checks them (``Invalid beta parameter at index i``)."""
    if len(betas) != n:
        raise ValueError(f"Invalid betas: {betas} (expected {n} values)")
    for i, beta in enumerate(betas):
        b = _as_float(beta)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
