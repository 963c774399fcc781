"""Masks under torch.distributed: keeping them identical on every rank (DDP, ZeRO) and sharded with their
parameters (FSDP2).

Who decides a mask:
- DDP and ZeroRedundancyOptimizer keep every rank's parameters bitwise identical (same initial broadcast, the same
  all-reduced gradients, a deterministic step), so a pruning decision made from the weights (magnitude, global or
  per layer) comes out the same on every rank and needs no communication. Decisions that draw random numbers
  (``RandomUnstructured``) or read rank-local data (activations of a rank's batch) differ: ``sync_masks(model)``
  then broadcasts rank 0's masks and masked weights (coalesced: 1 byte plus the weight's bytes per entry).
  ``masks_in_sync(model)`` checks, with one small all-reduce, that every rank holds the same masks.
- FSDP2 (``fully_shard``): a mask is a DTensor sharded like its parameter, so each rank holds and updates only its
  shard's mask (nnopt's fused step applies it to the local shards). ``nnopt.prune.global_unstructured`` on the
  sharded parameters selects across all shards (one all-reduce per radix pass) and makes those DTensor masks
  itself; ``shard_masks(model)`` converts masks made before ``fully_shard`` (scattered from rank 0).

Forward under FSDP2: during a forward FSDP2 puts the gathered (unsharded) parameter in the module. nnopt.prune's
mask link (a forward pre-hook) leaves that plain tensor alone when the mask is a DTensor (DTensor forbids mixing
the two); the DTensor parameter stays linked to its sharded mask. Gradients are then masked by the optimizer's
kernel (nnopt optimizers) rather than by a gradient hook before the reduce-scatter; torch.optim optimizers keep
the weights at zero through the contract's post-step hook.
``nnopt.nn.MaskedLinear`` reads its whole mask in forward: under FSDP2 keep its mask unsharded (prune before
``fully_shard`` and do not call ``shard_masks`` on it), or use plain ``nn.Linear`` layers pruned by nnopt.prune.
"""

import torch

from nnopt import sparsity
from nnopt.prune import _contract

__all__ = ["masks_in_sync", "shard_masks", "sync_masks"]


def _dtensor_type():
    import sys

    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _masked(model):
    """(module, name, parameter, mask buffer) for every tensor of ``model`` pruned under nnopt.prune's contract."""
    for module in model.modules():
        for name in _contract.pruned_names(module):
            yield module, name, getattr(module, name), module._buffers[name + _contract.MASK_SUFFIX]


@torch.no_grad()
def shard_masks(model):
    """Prepares a ``fully_shard`` model's masks: each mask of a DTensor parameter becomes a DTensor sharded like it
    (a plain mask made before sharding is scattered from rank 0, so every rank keeps the same decision).
    Idempotent; ``nnopt.prune.global_unstructured`` calls it on the modules it prunes. Returns ``model``."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return model
    from torch.distributed.tensor import distribute_tensor

    for module, name, param, mask in list(_masked(model)):
        if isinstance(param, dtensor) and not isinstance(mask, dtensor):
            mask = distribute_tensor(mask, param.device_mesh, param.placements)
            module._buffers[name + _contract.MASK_SUFFIX] = mask
            sparsity.set_mask(param, mask)
    return model


def _plain_masks(model):
    dtensor = _dtensor_type()
    return [(p, m) for _, _, p, m in _masked(model) if dtensor is None or not isinstance(m, dtensor)]


@torch.no_grad()
def sync_masks(model, src=0, group=None):
    """Makes every rank's masks and masked weights equal to rank ``src``'s: one broadcast of all the masks packed
    together, one of the masked weights per dtype (a rank's own decision may have zeroed weights that ``src``
    keeps). Every rank must call it with the same model structure. Returns ``model``."""

    pairs = _plain_masks(model)
    if not pairs:
        return model
    _broadcast_packed([m for _, m in pairs], src, group)
    by_dtype = {}
    for p, _ in pairs:
        by_dtype.setdefault(p.dtype, []).append(p)
    for params in by_dtype.values():
        _broadcast_packed(params, src, group)
    for p, m in pairs:
        sparsity.zero_pruned_(p, m)
    return model


def _broadcast_packed(tensors, src, group):
    """Broadcasts same-dtype tensors as one flat buffer and copies the result back in place (optimizers and
    layers keep holding the same tensor objects)."""
    import torch.distributed as dist

    packed = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(packed, src=src, group=group)
    start = 0
    for t in tensors:
        t.detach().copy_(packed[start:start + t.numel()].view_as(t))
        start += t.numel()


@torch.no_grad()
def masks_in_sync(model, group=None):
    """True when every rank of ``group`` holds the same (plain, unsharded) masks: a checksum of each mask is
    compared across ranks with one all-reduce of two small vectors (min and max)."""
    import torch.distributed as dist

    pairs = _plain_masks(model)
    if not pairs:
        return True
    sums = []
    for _, m in pairs:
        flat = m.reshape(-1)
        idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
        # a position-weighted checksum (int64 arithmetic wraps): any flipped entry changes it
        sums.append(torch.stack([flat.sum(), ((idx * 0x9E3779B1 + 1) * flat).sum()]))
    local = torch.cat(sums)
    both = torch.cat([local, -local])  # one MAX all-reduce gives the max and (negated) the min
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = local.numel()
    return bool(torch.equal(both[:n], -both[n:]))
