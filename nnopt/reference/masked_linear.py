"""Plain-PyTorch masked linear products: the test oracle and the ``torch`` backend of the masked_linear family.

Same names and signatures as nnopt.kernels.masked_linear and the registered ops (``layout`` is a
nnopt.nn.layout.BlockLayout, unused here). Shapes: x [M, K], dy [M, N], weight and mask [N, K] (mask bool),
bias [N]. Masked entries of ``weight`` are ignored even when nonzero (``where``, so a NaN there is ignored too).
"""

import torch


def _masked(weight, mask):
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_linear(x, weight, mask, bias, layout=None):
    """y [M, N] = x (W ⊙ mask)ᵀ + bias."""
    return torch.nn.functional.linear(x, _masked(weight, mask), bias)


def masked_linear_dx(dy, weight, mask, layout=None):
    """dx [M, K] = dy (W ⊙ mask)."""
    return dy @ _masked(weight, mask)


def masked_linear_dw(dy, x, mask, layout=None):
    """dW [N, K] = (dyᵀ x) ⊙ mask: exactly 0 outside the mask."""
    return _masked(dy.t() @ x, mask)
