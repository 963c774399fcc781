"""Pruning patterns beyond torch.nn.utils.prune, on the same mask contract.

- ``nm_structured``: N:M sparsity. Along the input dimension, every group of ``m`` consecutive entries keeps
  its ``n`` largest magnitudes (2:4 is the pattern sparse tensor cores run).
- ``block_unstructured``: whole ``(bn, bk)`` blocks of a weight viewed as ``(rows, cols)`` are pruned by their L1
  norm (sum of |w|; the smaller edge blocks by the sum over their own entries, not rescaled), for the
  block-sparse kernels of ``masked_linear``.
- ``zeros``: masks the entries that are exactly 0 (what the L1 proximal optimizers drive weights to).

All three prune on top of any earlier mask; ties are broken toward the lower index, so the masks are
deterministic.
"""

import numbers

import torch

from nnopt.layers import in_dim, is_conv1d
from nnopt.prune._contract import apply_mask, current_mask, get_param
from nnopt.prune.methods import check_amount, check_dim, scores_for


def _check_int(value, arg, low):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{arg}={value} must be >= {low}")


def nm_structured(module, name, n=2, m=4, dim=None, importance_scores=None):
    """Keeps the ``n`` largest |w| of every ``m`` consecutive entries of ``module.<name>`` along ``dim``.

    ``dim`` defaults to the input dimension: the last one of a 1-D or 2-D (Linear) weight, 0 of a transformers
    ``Conv1D`` weight (stored ``[in, out]``), 1 (input channels) of a convolution weight. Entries already pruned
    count as the smallest. ValueError when ``n`` is not in [0, m]
    or the size along ``dim`` is not divisible by ``m``.
    """
    _check_int(m, "m", 1)
    _check_int(n, "n", 0)
    if n > m:
        raise ValueError(f"n={n} must be <= m={m}")
    t = get_param(module, name)
    if t.dim() == 0:
        raise ValueError(f"N:M pruning needs a tensor with at least 1 dimension; {name} is a scalar")
    if dim is None:
        if name == "weight" and is_conv1d(module):
            dim = in_dim(module)
        else:
            dim = t.dim() - 1 if t.dim() <= 2 else 1
    check_dim(t, dim)
    if t.shape[dim] % m:
        raise ValueError(f"m={m} must divide the size {t.shape[dim]} of dimension {dim} of {name} "
                         f"(shape {tuple(t.shape)})")
    old = current_mask(module, name)
    with torch.no_grad():
        score = scores_for(module, name, t, importance_scores).abs().float().masked_fill(~old, -1.0)
        grouped = score.movedim(dim, -1).reshape(-1, m)
        order = torch.sort(grouped, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, order[:, :n], True)
        keep = keep.reshape(score.movedim(dim, -1).shape).movedim(-1, dim)
    return apply_mask(module, name, old & keep)


def _check_block(block):
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"block must be a (bn, bk) pair of ints, got {block!r}")
    for arg, value in zip(("block[0]", "block[1]"), block):
        _check_int(value, arg, 1)
    return int(block[0]), int(block[1])


def block_sums(t, block):
    """Sum of |t| over each ``block`` of ``t`` viewed as ``(shape[0], -1)``: a ``(ceil(R/bn), ceil(C/bk))`` tensor."""
    bn, bk = block
    x = t.detach().reshape(t.shape[0], -1).abs().float()
    rows, cols = x.shape
    gr, gc = -(-rows // bn), -(-cols // bk)
    x = torch.nn.functional.pad(x, (0, gc * bk - cols, 0, gr * bn - rows))
    return x.reshape(gr, bn, gc, bk).sum(dim=(1, 3))


def _expand(blocks, block, shape):
    bn, bk = block
    rows, cols = shape[0], (shape.numel() // shape[0] if shape[0] else 0)
    full = blocks.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:rows, :cols]
    return full.reshape(shape)


def block_unstructured(module, name, amount, block=(32, 32), importance_scores=None):
    """Prunes whole ``block = (bn, bk)`` blocks of ``module.<name>`` (viewed as ``(shape[0], -1)``) by L1 norm.

    A transformers ``Conv1D`` weight (stored ``[in, out]``) is viewed as ``[out, in]``, as an ``nn.Linear``'s:
    ``bn`` runs along the outputs and ``bk`` along the inputs for both.

    ``amount``: a fraction in [0, 1] of the blocks that still hold an unpruned entry (rounded as torch rounds),
    or an int count of them; the blocks with the smallest sum of |w| (or of |importance_scores|) go first.
    ValueError for an amount out of range or larger than the number of remaining blocks.
    """
    check_amount(amount)
    block = _check_block(block)
    t = get_param(module, name)
    if t.dim() < 2:
        raise ValueError(f"block pruning needs a tensor with at least 2 dimensions; {name} has shape "
                         f"{tuple(t.shape)}")
    old = current_mask(module, name)
    flip = name == "weight" and is_conv1d(module)  # score and cut blocks in the [out, in] view
    view = (lambda x: x.t()) if flip else (lambda x: x)
    with torch.no_grad():
        scores = view(scores_for(module, name, t, importance_scores).masked_fill(~old, 0))
        sums = block_sums(scores, block).flatten()
        alive = block_sums(view(old).float(), block).flatten() > 0
        remaining = int(alive.sum())
        k = amount if isinstance(amount, numbers.Integral) else round(amount * remaining)
        if k > remaining:
            raise ValueError(f"amount={amount} should be smaller than the number of blocks left to prune="
                             f"{remaining}")
        order = torch.sort(sums.masked_fill(~alive, float("inf")), stable=True).indices
        keep = torch.ones_like(sums, dtype=torch.bool)
        keep[order[:k]] = False
        gr = -(-scores.shape[0] // block[0])
        keep = view(_expand(keep.reshape(gr, -1), block, scores.shape))
    return apply_mask(module, name, old & keep)


def zeros(module, name):
    """Masks the entries of ``module.<name>`` that are exactly 0, on top of any earlier mask."""
    t = get_param(module, name)
    return apply_mask(module, name, current_mask(module, name) & (t.detach() != 0))
