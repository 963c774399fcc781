"""Global unstructured pruning across many tensors without concatenating their scores.

torch.nn.utils.prune.global_unstructured flattens every score and mask into one vector and runs ``topk`` on it
(13x the weights' memory on a 101M-parameter MLP). Here the pruning threshold comes from a selection over the
list of tensors, ``kth_smallest(scores, masks, k) -> (tau, n_less)``: ``tau`` is the k-th smallest eligible
score and ``n_less`` the number of eligible scores below it. Every eligible entry below ``tau`` is pruned, plus
the first ``k - n_less`` eligible entries equal to ``tau`` (lowest index first, tensors in order), so exactly
``k`` entries go and, on tie-free scores, the masks equal torch's.

``amount`` is relative to the entries still unpruned across all the tensors, as in torch. ``L1Unstructured``
ranks |importance_scores| (default |weight|), ``RandomUnstructured`` ranks uniform random numbers; any other
unstructured ``BasePruningMethod`` subclass falls back to torch's concatenating computation.

Sharded parameters (DTensors: FSDP2's ``fully_shard``): every rank selects over its local shards with the
histograms summed across ranks (nnopt.prune._select), so tau, n_less and the masks equal one process's; ties at
tau go lowest index first in each tensor's flat order when it is sharded along dim 0 (FSDP2's Shard(0)): a table of
per-shard tie counts, one all-reduce, gives each rank its share. The masks are DTensors sharded like the
parameters (nnopt.distributed.shard_masks prepares the modules). Every rank must make the same call.
"""

import numbers
from collections.abc import Iterable

import torch
from torch.nn.utils import prune as _tp

from nnopt.prune._contract import MASK_SUFFIX, apply_mask, get_param
from nnopt.prune.methods import check_amount
from nnopt.prune._select import Shards, _dtensor_type, kth_smallest_sharded


_SLICE = 1 << 18  # entries per slice of the masking pass: temporaries stay a few MB whatever the model size


@torch.no_grad()
def _masks_from_threshold(scores, masks, k, magnitude):
    """Yields the new bool masks, keeping all but the k smallest eligible scores (|scores| when ``magnitude``;
    ties at the threshold: lowest index first), one at a time and built slice by slice into the mask itself."""
    shards = Shards(scores, masks)
    tau, n_less, n_equal = kth_smallest_sharded(shards, k, magnitude=magnitude)
    ties = k - n_less
    dtypes = {s.dtype for s in scores}
    # compare in a type that holds tau exactly: the selection ranked mixed dtypes in their widest one
    wide = torch.float64 if torch.float64 in dtypes else torch.float32 if len(dtypes) > 1 else None
    # Sharded, with more entries at tau than are pruned: each rank's share of the ties (else every rank prunes
    # all of its entries at tau: they number at most n_equal == ties)
    budgets = _tie_budgets(shards, tau, ties, magnitude, wide) if shards.groups and n_equal > ties else None
    for i, (t, m) in enumerate(zip(scores, masks)):
        s, m = (t.to_local(), m.to_local() if m is not None else None) if shards.groups else (t, m)
        if budgets is not None:
            ties = budgets[i]
        flat = s.reshape(-1)
        out = m.clone() if m is not None else torch.ones(s.shape, dtype=torch.bool, device=s.device)
        out_flat = out.view(-1)
        for a in range(0, flat.numel(), _SLICE):
            x = flat[a:a + _SLICE]
            x = x.abs() if magnitude else x
            x = x.to(wide) if wide is not None else x
            keep = x > tau
            if ties > 0:
                at = (x == tau)
                at &= out_flat[a:a + _SLICE]
                at = at.nonzero().flatten()
                keep[at[ties:]] = True
                ties -= min(ties, at.numel())
            else:
                keep |= x == tau
            keep |= torch.isnan(x)  # the selection ranks NaN last: never among the k pruned
            out_flat[a:a + _SLICE] &= keep
        if shards.groups:
            from torch.distributed.tensor import DTensor

            out = DTensor.from_local(out, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                     stride=t.stride())
        yield out


def _eq(x, tau, magnitude, wide):
    x = x.abs() if magnitude else x
    return (x.to(wide) if wide is not None else x) == tau


def _tie_budgets(shards, tau, ties, magnitude, wide):
    """How many of its eligible entries equal to tau each local tensor prunes, so that across the shards the
    ``ties`` pruned are the first in (tensor, shard, index) order: one all-reduce of a [shards, tensors] table."""
    n = len(shards.scores)
    device = shards.scores[0].device
    table = torch.zeros(shards.count, n, dtype=torch.int64, device=device)
    for i, (s, m) in enumerate(zip(shards.scores, shards.masks)):
        flat, mf = s.reshape(-1), None if m is None else m.reshape(-1)
        for a in range(0, flat.numel(), _SLICE):
            at = _eq(flat[a:a + _SLICE], tau, magnitude, wide)
            if mf is not None:
                at &= mf[a:a + _SLICE]
            table[shards.position, i] += at.sum()
    counts = shards.all_reduce(table).t().reshape(-1).cpu()  # (tensor, shard) order
    before = counts.cumsum(0) - counts
    budget = (ties - before).clamp(0).minimum(counts).view(n, shards.count)
    return [int(budget[i, shards.positions[i]]) for i in range(n)]


def global_unstructured(parameters, pruning_method, importance_scores=None, **kwargs):
    """Prunes ``amount`` of the remaining entries across all ``(module, name)`` pairs in ``parameters`` at once.

    Same signature and errors as torch.nn.utils.prune.global_unstructured: TypeError when ``parameters`` is not
    an iterable, ``importance_scores`` not a dict or the method not unstructured; ValueError for an amount out of
    range or larger than the number of remaining entries. All checks run before any tensor is touched.
    """
    if not isinstance(parameters, Iterable):
        raise TypeError("global_unstructured(): parameters is not an Iterable")
    parameters = list(parameters)
    importance_scores = importance_scores if importance_scores is not None else {}
    if not isinstance(importance_scores, dict):
        raise TypeError("global_unstructured(): importance_scores must be of type dict")
    if "amount" in kwargs:
        check_amount(kwargs["amount"])
    method = pruning_method(**kwargs)
    if method.PRUNING_TYPE != "unstructured":
        raise TypeError('Only "unstructured" PRUNING_TYPE supported for the `pruning_method`. '
                        f"Found method {pruning_method} of type {method.PRUNING_TYPE}")
    tensors, scores = [], []
    for module, name in parameters:
        t = get_param(module, name)
        s = importance_scores.get((module, name), t)
        if not isinstance(s, torch.Tensor) or s.shape != t.shape:
            raise AssertionError(f"importance_scores[(module, {name!r})] should have the shape {tuple(t.shape)} "
                                 f"of the parameter, got {getattr(s, 'shape', type(s).__name__)}")
        tensors.append(t)
        scores.append(s.detach())
    sharded = _prepare_sharded(parameters, tensors)
    masks = [module._buffers.get(name + MASK_SUFFIX) for module, name in parameters]
    if sharded:
        shards = Shards(tensors, masks)
        remaining = sum(int(m.sum()) if m is not None else s.numel() for s, m in zip(shards.scores, shards.masks))
        remaining = int(shards.all_reduce(torch.tensor([remaining], device=shards.scores[0].device)))
    else:
        remaining = sum(int(m.sum()) if m is not None else t.numel() for t, m in zip(tensors, masks))

    if type(method) in (_tp.L1Unstructured, _tp.RandomUnstructured):
        amount = method.amount
        k = amount if isinstance(amount, numbers.Integral) else round(amount * remaining)
        _tp._validate_pruning_amount(k, remaining)
        if k == 0:
            new = [m.clone() if m is not None else torch.ones_like(t, dtype=torch.bool) for t, m in zip(tensors, masks)]
        elif isinstance(method, _tp.L1Unstructured):
            new = _masks_from_threshold(scores, masks, k, magnitude=True)
        else:
            new = _masks_from_threshold([torch.rand_like(t, dtype=torch.float32) for t in tensors], masks, k, False)
    elif sharded:
        raise TypeError(f"global_unstructured on DTensor parameters supports L1Unstructured and RandomUnstructured, "
                        f"not {pruning_method.__name__}")
    else:
        new = _concatenated(method, tensors, scores, masks)
    for (module, name), mask in zip(parameters, new):
        apply_mask(module, name, mask, copy=False)


def _prepare_sharded(parameters, tensors):
    """Whether any tensor is a DTensor; then the modules get sharded masks first (nnopt.distributed.shard_masks)."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        return False
    from nnopt.distributed import shard_masks

    for module in {id(m): m for m, _ in parameters}.values():
        shard_masks(module)
    return True


def _concatenated(method, tensors, scores, masks):
    """torch's own computation (one vector of every score) for pruning methods this module does not know."""
    flat = torch.nn.utils.parameters_to_vector(scores)
    default = torch.nn.utils.parameters_to_vector(
        [m.to(flat.dtype) if m is not None else torch.ones_like(t, dtype=flat.dtype) for t, m in zip(tensors, masks)])
    container = _tp.PruningContainer()
    container._tensor_name = method._tensor_name = "temp"
    container.add_pruning_method(method)
    final = container.compute_mask(flat, default) != 0
    out, start = [], 0
    for t in tensors:
        out.append(final[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out
