"""Low-precision states of DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): how they are stored.

Each rank quantizes its local shard as a tensor of its own: blocks start at the shard's first element, so no block
straddles a shard boundary, and the step on a rank equals the single-process step on a plain tensor holding that
shard (codes identical). ``self.state[p]`` keeps DTensors over ``p``'s mesh, so ``opt.state_dict()`` /
``load_state_dict`` and ``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, sharded or ``full_state_dict``) save and restore them on the same mesh:

- states with one value per element (8-bit codes, bf16 and fp32 states, fp32 masters) are sharded like ``p``
  (same placements, global shape and local shapes);
- states with a per-shard length (4-bit codes: ceil(n_local / 2) bytes; the scales: one per block of the local
  shard) use a *flat per-rank layout*: a 1-D DTensor whose placements are ``Shard(0)`` on each mesh dimension
  where ``p`` is sharded (``Replicate()`` where it is replicated), each rank holding ``L`` elements, ``L`` that
  length for the largest shard (rank 0's under torch.chunk's sharding); smaller shards are padded with zeros. A
  uniform ``L`` is what makes it a valid DTensor (every rank derives the same global shape without talking).

The format choice (``min_quant_size``) reads the largest local shard's size, so every rank picks the same format
and a checkpoint is consistent. A checkpoint reloads onto the same mesh and world size; to move to another one,
save ``nnopt.optim.dequantized_state_dict(opt)`` (fp32 states sharded like the parameters, which
torch.distributed.checkpoint reshards) and load it: fp32 states are quantized on load.
"""

import math

import torch

from nnopt.reference import quant_optim as qref

BLOCKS = tuple(2**k for k in range(5, 13))  # the block sizes a state may have been saved with


def max_shard_numel(p):
    """Elements of ``p``'s largest local shard (torch.chunk gives the first ranks the ceil-sized chunks)."""
    shape = list(p.shape)
    for mdim, pl in enumerate(p.placements):
        if pl.is_shard():
            shape[pl.dim] = -(-shape[pl.dim] // p.device_mesh.size(mdim))
    return math.prod(shape)


def _flat_spec(p):
    """(placements, ranks holding distinct data) of ``p``'s flat per-rank layout."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(Shard(0) if pl.is_shard() else Replicate() for pl in p.placements)
    ranks = math.prod(p.device_mesh.size(d) for d, pl in enumerate(p.placements) if pl.is_shard())
    return placements, ranks


def like_param(local, p):
    """A DTensor sharded like ``p`` whose local shard is ``local`` (reshaped to ``p``'s local shape)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.reshape(p.to_local().shape), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def flat(local, p, length):
    """A flat per-rank DTensor of ``length`` elements per rank whose local part starts with ``local`` (1-D)."""
    from torch.distributed.tensor import DTensor

    placements, ranks = _flat_spec(p)
    padded = local.new_zeros(length)
    padded[:local.numel()] = local
    return DTensor.from_local(padded, p.device_mesh, placements, run_check=False, shape=(length * ranks,),
                              stride=(1,))


def unsharded_error(name, key, p, t):
    got = f"a DTensor with placements {t.placements} and shape {tuple(t.shape)}" if hasattr(t, "placements") \
        else "a plain tensor"
    return ValueError(f"{name}: the {key} of a DTensor parameter ({p.placements}, shape {tuple(p.shape)}) is {got}; "
                      "load sharded checkpoints with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict "
                      "(or opt.load_state_dict of this optimizer's own state_dict on the same mesh)")


class ShardState:
    """``self.state[p]`` (or a saved state dict) of a DTensor parameter ``p`` seen through the rank's shard, so that
    the format code of nnopt/optim/_quant_state.py runs unchanged on local tensors: reading a key gives its local
    tensor (a flat state: the used part, a view), writing a local tensor wraps it back into a DTensor. Non-tensor
    entries and ``step`` pass through."""

    def __init__(self, state, p, name):
        self.state, self.p, self.name = state, p, name
        self.local = p.to_local()
        self.n_max = max_shard_numel(p)

    def __contains__(self, key):
        return key in self.state

    def get(self, key, default=None):
        return self[key] if key in self.state else default

    def pop(self, key, default=None):
        return self.state.pop(key, default)

    def _kind(self, key, t):
        """'param' (sharded like p) or 'flat'; raises when ``t`` is neither (e.g. an unsharded state)."""
        from torch.distributed.tensor import DTensor

        p = self.p
        if isinstance(t, DTensor) and t.device_mesh == p.device_mesh:
            if tuple(t.placements) == tuple(p.placements) and t.shape == p.shape:
                return "param"
            placements, ranks = _flat_spec(p)
            if t.dim() == 1 and tuple(t.placements) == placements and t.shape[0] % ranks == 0:
                return "flat"
        raise unsharded_error(self.name, key, p, t)

    def stored_block(self, key, prefer=None):
        """The block size a flat scales state ``key`` was made with (its per-rank length fixes it; when several
        fit, every one gives the same blocks, and ``prefer`` is taken)."""
        length = self.state[key].to_local().numel()
        cands = ([prefer] if prefer in BLOCKS else []) + list(BLOCKS)
        return next((b for b in cands if qref.num_blocks(self.n_max, b) == length), None)

    def __getitem__(self, key):
        t = self.state[key]
        if key == "step" or not isinstance(t, torch.Tensor):
            return t
        if self._kind(key, t) == "param":
            return t.to_local()
        loc = t.to_local()
        n = self.local.numel()
        if key.endswith("_absmax"):
            block = self.stored_block(key)
            used = qref.num_blocks(n, block) if block is not None else loc.numel()
        else:  # 4-bit codes
            used = qref.codes_numel(n, 4)
        return loc[:used]

    def __setitem__(self, key, local):
        """Stores a local tensor with one value per element of the shard (sharded like ``p``)."""
        self.state[key] = local if key == "step" else like_param(local, self.p)

    def put_quantized(self, key, codes, absmax, bits, block):
        """Stores a quantized state's local codes and scales (see the module docstring for the layouts)."""
        if bits == 8:
            self.state[key] = like_param(codes, self.p)
        else:
            self.state[key] = flat(codes, self.p, qref.codes_numel(self.n_max, 4))
        self.state[key + "_absmax"] = flat(absmax, self.p, qref.num_blocks(self.n_max, block))
