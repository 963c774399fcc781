"""Radix-select histogram in plain PyTorch: the oracle of the kernels' primitive and the `torch` backend.

``select_histogram(hist, scores, masks, key_bits, shift, bits, prefix)`` adds to ``hist`` (int64, 2**bits bins,
on the scores' device) the number of eligible entries (``masks[i]`` True, or all entries when it is None) of every
tensor in ``scores`` per value of the field ``(key >> shift) & (2**bits - 1)`` of their order key, counting only
entries whose key bits above the field, ``key >> (shift + bits)``, equal ``prefix`` (no condition when the field
is the key's top bits). The order key (``key_bits`` = 16, 32 or 64) is defined in nnopt/prune/_select.py:
the float's bits with -0.0 as +0.0, ``~u`` for negative values, ``u | sign`` otherwise, NaN as all ones. With
``magnitude`` the keys are those of ``|score|`` (L1 pruning ranks magnitudes without an ``abs()`` copy).

This one works through each tensor in slices of CHUNK entries with int64 temporaries of a slice's size (no
concatenation, a few tens of MB at most). ``kth_smallest`` is the shared driver of nnopt/prune/_select.py over this
primitive.
"""

import torch

CHUNK = 1 << 20
_INT = {16: torch.int16, 32: torch.int32, 64: torch.int64}
_FLOAT = {32: torch.float32, 64: torch.float64}


def order_keys(s, key_bits, magnitude=False):
    """The order keys of tensor ``s`` (flattened) as int64 bit patterns of unsigned key_bits-bit integers."""
    s = s.reshape(-1)
    if magnitude:
        s = s.abs()
    if key_bits != 16:
        s = s.to(_FLOAT[key_bits])
    u = s.view(_INT[key_bits]).to(torch.int64)
    if key_bits == 64:
        sign = torch.iinfo(torch.int64).min  # bit 63; int64 arithmetic on the bit pattern wraps
        full = -1
    else:
        sign = 1 << (key_bits - 1)
        full = (1 << key_bits) - 1
        u = u & full  # the unsigned bit pattern
    u = torch.where(u == sign, torch.zeros_like(u), u)  # -0.0 -> +0.0
    neg = (u & sign) != 0
    key = torch.where(neg, ~u & full, u | sign)
    return torch.where(torch.isnan(s), torch.full_like(key, full), key)


def _field(key, shift, bits):
    # right shifts of int64 are arithmetic: masking after the shift recovers the logical shift
    return (key >> shift) & ((1 << bits) - 1)


@torch.no_grad()
def select_histogram(hist, scores, masks, key_bits, shift, bits, prefix, magnitude=False):
    """Adds the field histogram of the eligible entries to ``hist`` in place; see the module docstring."""
    top = shift + bits >= key_bits
    for s, m in zip(scores, masks):
        s = s.reshape(-1)
        m = None if m is None else m.reshape(-1)
        for start in range(0, s.numel(), CHUNK):
            key = order_keys(s[start:start + CHUNK], key_bits, magnitude)
            keep = torch.ones_like(key, dtype=torch.bool) if m is None else m[start:start + CHUNK].clone()
            if not top:
                keep &= _field(key, shift + bits, key_bits - shift - bits) == prefix
            hist += torch.bincount(_field(key[keep], shift, bits), minlength=1 << bits)
    return hist


def kth_smallest(scores, masks, k, magnitude=False):
    """(tau, n_less): the k-th smallest eligible value (of |score| with magnitude) and the count of eligible
    entries below it; see nnopt.prune._select.kth_smallest."""
    from nnopt.prune import _select

    return _select.select(select_histogram, scores, masks, k, _select.RADIX_BITS["torch"], magnitude)
