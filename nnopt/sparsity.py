"""The mask registry: a parameter may carry a boolean mask; mask == False marks a pruned entry.

nnopt optimizers apply the mask inside their fused step, so pruned entries of the parameter and of every
optimizer state stay exactly 0. The pruning and masked-layer APIs build on these three functions.
"""

import torch

_ATTR = "_nnopt_mask"


def set_mask(param, mask):
    """Attaches ``mask`` (bool, same shape and device as ``param``) to ``param`` and zeroes its pruned entries."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"set_mask: param must be a tensor, got {type(param).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"set_mask: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"set_mask: mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != param.shape:
        raise ValueError(f"set_mask: mask shape {tuple(mask.shape)} differs from the parameter's {tuple(param.shape)}")
    if mask.device != param.device:
        raise ValueError(f"set_mask: mask is on {mask.device} but the parameter is on {param.device}")
    if param.is_complex():
        raise TypeError("set_mask: complex parameters cannot carry a mask")
    with torch.no_grad():
        zero_pruned_(param, mask)
    setattr(param, _ATTR, mask)
    return mask


def zero_pruned_(tensor, mask):
    """Sets the entries of ``tensor`` where ``mask`` is False to 0, in place, with no temporary the tensor's size."""
    return torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device), out=tensor)


def get_mask(param):
    """The parameter's bool mask, or None when it has none."""
    return getattr(param, _ATTR, None)


def clear_mask(param):
    """Removes the parameter's mask (its entries keep their current values)."""
    if hasattr(param, _ATTR):
        delattr(param, _ATTR)
