"""nnopt.nn.functional.masked_linear: ``y = x (W ⊙ mask)ᵀ + b`` on block-sparse kernels, with autograd.

Shapes: x [..., K] (any leading shape), weight and mask [N, K] (mask bool, True = kept), bias [N] or None;
y [..., N]. Gradients: dx = dy (W ⊙ mask), dW = (dyᵀ x) ⊙ mask (exactly 0 where the mask is False, computed
only on the mask's non-empty tiles), db = Σ dy. Masked entries of ``weight`` are ignored even when nonzero.

How a call runs is chosen per call by nnopt.nn.dispatch (``backend="auto"``: dense F.linear where sparsity is
too low to pay, the block-sparse kernels where it pays, GPU 2:4 sparse tensor cores for 2:4 masks at inference)
or forced (``backend="cpu" | "triton" | "torch"``; "torch" is the dense reference with the mask applied).
"""

import math

import torch

from nnopt.nn import dispatch
from nnopt.nn.layout import BlockLayout


class _MaskedLinearFn(torch.autograd.Function):
    """One autograd node for every way of computing the layer; ``impl`` holds the three products."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, layout, impl):
        ctx.save_for_backward(x, weight, mask)
        ctx.layout, ctx.impl = layout, impl
        return impl.masked_linear(x, weight, mask, bias, layout)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = ctx.impl.masked_linear_dx(dy, weight, mask, ctx.layout)
        if ctx.needs_input_grad[1]:
            dw = ctx.impl.masked_linear_dw(dy, x, mask, ctx.layout)
        if ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None, None, None


def check_args(x, weight, mask, bias, where="masked_linear"):
    """The errors a user sees for bad input, each naming the argument."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: input and weight must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{where}: mask must be a bool tensor, got {got}")
    if mask.shape != weight.shape:
        raise ValueError(f"{where}: mask has shape {tuple(mask.shape)}, weight has shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{where}: mask is on {mask.device}, weight on {weight.device}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: input has {x.shape[-1] if x.dim() else 0} features (last dim), "
                         f"weight expects in_features={weight.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"{where}: input is on {x.device}, weight on {weight.device}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{where}: input has dtype {x.dtype}, weight has dtype {weight.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be floating point, got {weight.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{where}: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"{where}: bias must match weight's dtype and device")


def masked_linear(x, weight, mask, bias=None, backend="auto", *, block_size=(32, 32), layout=None,
                  weight_is_masked=False, impl=None):
    """``x (weight ⊙ mask)ᵀ + bias`` (see the module docstring).

    ``block_size`` (block_n, block_k) tiles the mask when no ``layout`` (a BlockLayout of ``mask``) is given;
    layouts are cached per mask until it changes. ``weight_is_masked=True`` promises that ``weight`` already
    holds 0 at masked entries (the pruning contract: MaskedLinear does), which lets the dense path skip the
    masking pass. ``impl`` (from nnopt.nn.dispatch.choose) skips the choice. Under ``torch.autocast`` the
    operands are cast to the autocast dtype, as F.linear's are.
    """
    x, weight, bias = autocast_operands(x, weight, bias)
    check_args(x, weight, mask, bias)
    if layout is None:
        layout = dispatch.cached_layout(mask, *block_size)
    elif not isinstance(layout, BlockLayout) or layout.shape != tuple(mask.shape):
        raise ValueError("masked_linear: layout must be the BlockLayout of mask")
    if impl is None:
        impl = dispatch.choose(layout, x.numel() // max(1, x.shape[-1]), weight, backend, weight_is_masked,
                               grad_needed=needs_grad(x, weight, bias))
    return apply(x, weight, mask, bias, layout, impl)


def autocast_operands(x, weight, bias):
    """x, weight and bias in the autocast dtype when autocast is on for their device (as F.linear casts them)."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.is_floating_point() and isinstance(weight, torch.Tensor) and weight.is_floating_point():
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
    return x, weight, bias


def needs_grad(x, weight, bias):
    """Whether this call must build an autograd node."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def apply(x, weight, mask, bias, layout, impl):
    """The autograd node on x viewed as 2-D [M, K] (inputs already checked, ``impl`` chosen)."""
    if impl is dispatch.DENSE_MASKED and layout.density == 1.0:
        return torch.nn.functional.linear(x, weight, bias)  # nothing masked: torch's own layer, autograd included
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()  # (-1 is ambiguous when K == 0)
    mask = mask.contiguous()
    if impl is not dispatch.DENSE_MASKED:  # dense products take a transposed view (Conv1D's weight) as it is
        weight = weight.contiguous()
    if needs_grad(x, weight, bias):
        y = _MaskedLinearFn.apply(x2, weight, bias, mask, layout, impl)
    else:  # inference: no autograd node to build
        y = impl.masked_linear(x2, weight, mask, bias, layout)
    return y.reshape(*x.shape[:-1], weight.shape[0])
