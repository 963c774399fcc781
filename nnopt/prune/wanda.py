"""Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large Language Models").

Score of weight ``W_ij`` (output i, input j): ``|W_ij| · ||X_j||_2``, the norm of input feature j over every
calibration token. The weights are not updated; the lowest scores are pruned within a comparison group:

- unstructured, ``comparison="output"`` (default, the paper's per-output comparison group): each output row
  keeps its ``K - floor(K · sparsity)`` highest scores; ``comparison="layer"``: the layer keeps its
  ``n - floor(n · sparsity)`` highest scores (the paper's per-layer group; better where output rows differ much
  in scale, as in small models without LLM-style activation outliers);
- N:M: each group of M consecutive inputs in a row keeps its N highest scores;
- (bn, bk) blocks: a block scores the sum of its entries' scores; the layer keeps its
  ``B - floor(B · sparsity)`` highest-scoring blocks.

Ties: the sort is stable and descending, so among equal scores the lower index (input j, or entry or block in
row-major order) is kept. Entries an earlier mask pruned score -1 (0 in a block sum) and stay pruned.
"""

import torch

from nnopt.prune import oneshot

__all__ = ["wanda", "wanda_mask", "wanda_scores"]


def wanda_scores(weight, norms):
    """``|W| · norms``: weight ``[out, in]`` (any float dtype), norms ``[in]`` → float32 ``[out, in]``."""
    return weight.detach().abs().float() * norms.float().unsqueeze(0)


COMPARISONS = ("output", "layer")


def keep_top(score, pattern, sparsity, old=None, comparison="output"):
    """The bool keep-mask ``[out, in]`` of ``score`` under ``pattern`` (see the module docstring for the groups)."""
    rows, cols = score.shape
    if pattern.kind == "block":
        bn, bk = pattern.block
        if old is not None:
            score = score.masked_fill(~old, 0.0)
        tiles = score.reshape(rows // bn, bn, cols // bk, bk).sum(dim=(1, 3)).flatten()
        if old is not None:  # a block an earlier mask emptied stays pruned
            alive = old.reshape(rows // bn, bn, cols // bk, bk).any(dim=3).any(dim=1).flatten()
            tiles = tiles.masked_fill(~alive, -1.0)
        kept = tiles.numel() - int(tiles.numel() * sparsity)
        order = torch.sort(tiles, descending=True, stable=True).indices
        keep_tiles = torch.zeros_like(tiles, dtype=torch.bool)
        keep_tiles[order[:kept]] = True
        keep = keep_tiles.reshape(rows // bn, 1, cols // bk, 1).expand(-1, bn, -1, bk).reshape(rows, cols)
        return keep if old is None else keep & old
    if old is not None:
        score = score.masked_fill(~old, -1.0)
    if pattern.kind == "nm":
        groups = score.reshape(-1, pattern.m)
        kept = pattern.n
    elif comparison == "layer":
        groups = score.reshape(1, -1)
        kept = groups.numel() - int(groups.numel() * sparsity)
    else:
        groups = score
        kept = cols - int(cols * sparsity)
    keep = _keep_largest(groups, kept).reshape(rows, cols)
    return keep if old is None else keep & old


def _keep_largest(groups, kept):
    """Per row of ``groups`` [G, L], the ``kept`` largest entries (equal values: the lower index kept): what a
    stable descending sort keeps, found with one k-th value per row instead of a sort (2-3x faster on long rows)."""
    length = groups.shape[1]
    if kept >= length:
        return torch.ones_like(groups, dtype=torch.bool)
    if kept <= 0:
        return torch.zeros_like(groups, dtype=torch.bool)
    if length <= 16:  # N:M groups: a sort of a few entries is cheaper than the passes below
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :kept]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    threshold = torch.kthvalue(groups, length - kept, dim=1, keepdim=True).values  # the largest value pruned
    keep = groups > threshold
    ties = groups == threshold
    room = kept - keep.sum(1, keepdim=True)  # how many entries equal to the threshold are kept
    return keep | (ties & (ties.cumsum(1) <= room))


def _check_comparison(comparison):
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")


def wanda_mask(weight, norms, pattern="unstructured", sparsity=None, old=None, comparison="output"):
    """Wanda's keep-mask (bool ``[out, in]``) of ``weight`` ``[out, in]`` given ``norms`` ``[in]`` (``||X_j||_2``).

    ``pattern``, ``comparison``: as in ``wanda``; ``sparsity``: a float in [0, 1) (None for N:M); ``old``: an
    earlier keep-mask.
    """
    _check_comparison(comparison)
    pattern = oneshot.parse_pattern(pattern) if not isinstance(pattern, oneshot.Pattern) else pattern
    sparsity = pattern.sparsity if pattern.kind == "nm" else sparsity
    pattern.check_layer("weight", weight.shape[0], weight.shape[1])
    return keep_top(wanda_scores(weight, norms), pattern, sparsity, old, comparison)


class _Wanda:
    stats = "norms"

    def __init__(self, comparison):
        self.comparison = comparison

    def check(self, name, module):
        pass

    def prune(self, weight, stats, sparsity, pattern, old, name):
        return None, keep_top(wanda_scores(weight, stats.sqrt()), pattern, sparsity, old, self.comparison)


def wanda(model, calibration, sparsity=None, pattern="unstructured", layers=None, skip=("lm_head", "*.lm_head"),
          blocks=None, atomic=True, comparison="output", owl=None):
    """Prunes ``model``'s linear layers in place with Wanda; returns ``{layer name: sparsity}``.

    calibration: an iterable of model inputs (tensors, dicts of tensors as a DataLoader of tokenized text yields,
    or tuples), e.g. 128 sequences. sparsity: a float in [0, 1) or a dict of glob -> float (None for N:M).
    pattern: "unstructured", "N:M" (e.g. "2:4") or a (bn, bk) block. layers / skip / blocks / atomic: see
    ``nnopt.prune.oneshot``. comparison: "output" (per output row, the paper's default) or "layer" (the whole
    layer), for unstructured sparsity. owl: None or (M, lambda) for OWL's per-block sparsities (see
    ``nnopt.prune.oneshot``). The model runs in eval mode under no_grad, block by block; its training
    flag and ``config.use_cache`` are restored afterwards.
    """
    _check_comparison(comparison)
    return oneshot.run(model, calibration, _Wanda(comparison), sparsity, pattern, layers, skip, blocks, atomic,
                       "wanda", owl)
