"""Exact k-th smallest value over many tensors without concatenating them: a radix select over the float bits.

Every eligible entry (mask True, or every entry when the tensor's mask is None) is mapped to an unsigned
*order key* of ``key_bits`` bits whose integer order is the value order:

    u = the float's bit pattern;  -0.0 -> +0.0 (equal values, equal keys);
    key = ~u if the sign bit is set else u | sign_bit;   NaN -> all ones (ordered last, as torch.sort does)

``key_bits`` is 16 when every tensor is bfloat16, or every tensor is float16 (their own bits), 64 when any tensor
is float64 (every value converted exactly to float64), else 32 (float32 bits; bf16/fp16 convert exactly).

The driver walks the key from its top bits down, ``bits`` at a time. Each pass calls the backend's one primitive,
``select_histogram(hist, scores, masks, key_bits, shift, bits, prefix, magnitude)``, which adds to ``hist`` (int64,
2**bits bins) the count of eligible entries per value of the field ``(key >> shift) & (2**bits - 1)``, among the
entries whose bits above the field equal ``prefix``. The bin holding the k-th entry becomes the next prefix;
entries of lower bins are all smaller than the answer and add to ``n_less``. After the last pass the prefix is
the answer's whole key. With ``magnitude`` every key is that of ``|score|``: L1 pruning selects over the weights
themselves, with no ``abs()`` copy. Each pass reads every tensor once; extra memory is the histogram (O(bins ×
threads) in
the kernels). The backends differ only in the primitive and its field width: 16 bits (2 passes over float32) on
CPU, 8 bits (4 passes) on GPU, where a 256-bin per-program histogram is cheap to merge with integer atomics.

Sharded tensors: a histogram is a sum, so the selection over a list sharded across processes is the same walk with
each pass's local histogram summed across the shards: one integer all-reduce of 2**bits bins per pass (exact, so
every rank takes the same bin and ends with the same tau and n_less as one process holding every tensor).
``Shards`` works out the local pieces and the process groups: DTensor scores (FSDP2's ``fully_shard``, tensor
parallelism) reduce over the mesh dimensions that shard them (an entry replicated over such a dimension is counted
on its first coordinate only); plain tensors with ``group=`` are taken as this rank's pieces of a list sharded over
``group``. Every rank then makes the same calls (same k, dtypes, backend field width) and gets the same answer.
"""

import struct

import torch

from nnopt import backends

FAMILY = "select"
# Field width per backend (must divide 16): the CPU kernels keep a 2**16-bin histogram per thread, the GPU kernels
# a 2**8-bin one per program.
RADIX_BITS = {"cpu": 16, "torch": 16, "triton": 8, "cuda": 8}

_KEY_16 = {torch.bfloat16: "e", torch.float16: "e"}


def key_bits_of(dtypes):
    """The order-key width for tensors of these dtypes (see the module docstring)."""
    dtypes = set(dtypes)
    if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}:
        return 16
    return 64 if torch.float64 in dtypes else 32


def decode(key, key_bits, dtype):
    """The float whose order key is ``key`` (``dtype`` tells bf16 from fp16 when key_bits is 16)."""
    sign = 1 << (key_bits - 1)
    u = key ^ sign if key & sign else ~key & ((1 << key_bits) - 1)
    if key_bits == 64:
        return struct.unpack("<d", struct.pack("<Q", u))[0]
    if key_bits == 32:
        return struct.unpack("<f", struct.pack("<I", u))[0]
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", u << 16))[0]
    return struct.unpack("<e", struct.pack("<H", u))[0]


class Shards:
    """The local pieces of a list of (maybe sharded) scores and masks, and how to sum counts over the shards.

    ``scores``/``masks``: local tensors, in the order given (an entry replicated over a reducing mesh dimension is
    an empty view on every coordinate but the first, so each entry is counted once). ``groups``: process groups to
    all-reduce over in turn (empty when nothing is sharded). ``position``/``count``: this rank's index among the
    shards and their number (the shard order of Shard(0) placements is the flat order of each tensor).
    """

    def __init__(self, scores, masks=None, group=None):
        scores = list(scores)
        masks = [None] * len(scores) if masks is None else list(masks)
        self.groups, self.position, self.count = [], 0, 1
        self.positions = [0] * len(scores)  # per tensor: the position whose shard this rank holds (replicas: first)
        dtensor = _dtensor_type()
        sharded = [dtensor is not None and isinstance(t, dtensor) for t in scores]
        if not any(sharded):
            if any(dtensor is not None and isinstance(m, dtensor) for m in masks):
                raise ValueError("kth_smallest: a mask is a DTensor but its scores are plain tensors")
            self.scores, self.masks = scores, masks
            if group is not None:
                import torch.distributed as dist

                self.groups = [group]
                self.position, self.count = dist.get_rank(group), dist.get_world_size(group)
                self.positions = [self.position] * len(scores)
            return
        if not all(sharded):
            raise ValueError("kth_smallest: scores mix DTensors and plain tensors; pass all of one kind")
        if group is not None:
            raise ValueError("kth_smallest: group= is for plain tensors; DTensors reduce over their own mesh")
        mesh = scores[0].device_mesh
        dims = set()
        for i, (t, m) in enumerate(zip(scores, masks)):
            if t.device_mesh != mesh:
                raise ValueError(f"kth_smallest: scores[{i}] is on another device mesh than scores[0]")
            if m is not None and (not isinstance(m, dtensor) or m.device_mesh != mesh or m.placements != t.placements):
                raise ValueError(f"kth_smallest: masks[{i}] must be a DTensor sharded like scores[{i}] "
                                 f"({t.placements})")
            for d, p in enumerate(t.placements):
                if p.is_partial():
                    raise ValueError(f"kth_smallest: scores[{i}] has a Partial placement; reduce it first")
                if p.is_shard():
                    dims.add(d)
        dims = sorted(dims)
        self.scores, self.masks = [], []
        for t, m in zip(scores, masks):
            s, m = t.to_local(), None if m is None else m.to_local()
            if any(not t.placements[d].is_shard() and mesh.get_local_rank(d) != 0 for d in dims):
                s, m = s.reshape(-1)[:0], None  # a replica: counted on the first coordinate
            self.scores.append(s)
            self.masks.append(m)
        self.groups = [mesh.get_group(d) for d in dims]
        for d in dims:
            self.position = self.position * mesh.size(d) + mesh.get_local_rank(d)
            self.count *= mesh.size(d)
        for i, t in enumerate(scores):
            pos = 0
            for d in dims:
                pos = pos * mesh.size(d) + (mesh.get_local_rank(d) if t.placements[d].is_shard() else 0)
            self.positions[i] = pos

    def all_reduce(self, t):
        """Sums ``t`` (an integer tensor) over the shards, in place; returns it."""
        if self.groups:
            import torch.distributed as dist

            for g in self.groups:
                dist.all_reduce(t, group=g)
        return t


def _dtensor_type():
    import sys

    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _check(scores, masks, k):
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            k = int(k.__index__())
        except (AttributeError, TypeError):
            raise TypeError(f"kth_smallest: k must be an int, got {type(k).__name__}") from None
    if k < 1:
        raise ValueError(f"kth_smallest: k must be >= 1, got k={k}")
    scores = list(scores)
    masks = [None] * len(scores) if masks is None else list(masks)
    if len(masks) != len(scores):
        raise ValueError(f"kth_smallest: masks has {len(masks)} entries, scores has {len(scores)}")
    if not scores:
        raise ValueError(f"kth_smallest: k={k} exceeds the 0 eligible entries (scores is empty)")
    device = scores[0].device
    out_s, out_m = [], []
    for i, (s, m) in enumerate(zip(scores, masks)):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"kth_smallest: scores[{i}] must be a floating-point tensor")
        if s.device != device:
            raise ValueError(f"kth_smallest: scores[{i}] is on {s.device}, scores[0] on {device}")
        if m is not None:
            if m.dtype != torch.bool or m.shape != s.shape or m.device != device:
                raise ValueError(f"kth_smallest: masks[{i}] must be a bool tensor of shape {tuple(s.shape)} "
                                 f"on {device}")
            m = m.contiguous()
        # order is irrelevant to a histogram, but a mask pairs with its score by position: both contiguous
        out_s.append(s.detach().contiguous())
        out_m.append(m)
    return out_s, out_m, k, device


@torch.no_grad()
def select(histogram, scores, masks, k, bits, magnitude=False, reduce=None):
    """The radix-select driver over the primitive ``histogram`` (a backend's ``select_histogram``), ``bits`` per
    pass; ``reduce`` (a Shards' all_reduce, or None) sums each pass's histogram across shards. Returns (tau,
    n_less); see ``kth_smallest``."""
    return select_with_count(histogram, scores, masks, k, bits, magnitude, reduce)[:2]


@torch.no_grad()
def select_with_count(histogram, scores, masks, k, bits, magnitude=False, reduce=None):
    """``select``, returning (tau, n_less, n_equal): n_equal the number of eligible entries equal to tau."""
    scores, masks, k, device = _check(scores, masks, k)
    key_bits = key_bits_of(s.dtype for s in scores)
    bits = min(bits, key_bits)
    n_less, prefix, shift, first = 0, 0, key_bits, True
    while shift > 0:
        shift -= bits
        hist = torch.zeros(1 << bits, dtype=torch.int64, device=device)
        histogram(hist, scores, masks, key_bits, shift, bits, prefix, bool(magnitude))
        if reduce is not None:
            reduce(hist)
        counts = hist.cpu()
        cum = counts.cumsum(0)
        if first:
            total = int(cum[-1])
            if k > total:
                raise ValueError(f"kth_smallest: k={k} exceeds the {total} eligible entries")
            first = False
        b = int(torch.searchsorted(cum, torch.tensor([k]), right=False)[0])
        below = int(cum[b] - counts[b])
        n_less += below
        k -= below
        prefix = (prefix << bits) | b
    return decode(prefix, key_bits, scores[0].dtype), n_less, int(counts[b])


def kth_smallest(scores, masks, k, backend=None, magnitude=False, group=None):
    """The k-th smallest eligible value over a list of tensors, exactly, without concatenating them.

    scores: list of floating tensors (float32, float64, bfloat16, float16; any shapes; one device).
    masks: None, or a list as long as scores of bool tensors (True = eligible; same shape as the score) or None
    (every entry eligible). k: int, 1 <= k <= number of eligible entries (ValueError naming k otherwise).
    Returns (tau, n_less): tau the k-th smallest eligible value as a Python float (the value of an actual entry;
    -0.0 and +0.0 are one value, returned as +0.0), n_less the number of eligible entries strictly below tau.
    The entries <= tau number at least k; exactly k when tau is not tied. magnitude=True ranks |score| instead
    (tau is then a magnitude), reading the scores themselves: no abs() copy. backend: see nnopt.backends.

    Sharded lists (see the module docstring): DTensor scores and masks (masks sharded like their scores), or plain
    tensors with ``group=`` (this rank's pieces); k and the answer are global, and every rank of the shards must
    call with the same k, dtypes and backend.
    """
    return kth_smallest_sharded(Shards(scores, masks, group), k, backend, magnitude)[:2]


def kth_smallest_sharded(shards, k, backend=None, magnitude=False):
    """``kth_smallest`` over a ``Shards``; returns (tau, n_less, n_equal)."""
    scores = shards.scores
    device = scores[0].device if scores else torch.device("cpu")
    name = backends.resolve(FAMILY, backend, device)
    impl = backends.implementation(FAMILY, name)
    reduce = shards.all_reduce if shards.groups else None
    return select_with_count(impl.select_histogram, scores, shards.masks, k, RADIX_BITS[name], magnitude, reduce)
