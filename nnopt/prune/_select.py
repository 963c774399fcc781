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
def select(histogram, scores, masks, k, bits, magnitude=False):
    """The radix-select driver over the primitive ``histogram`` (a backend's ``select_histogram``), ``bits`` per
    pass. Returns (tau, n_less); see ``kth_smallest``."""
    scores, masks, k, device = _check(scores, masks, k)
    key_bits = key_bits_of(s.dtype for s in scores)
    bits = min(bits, key_bits)
    n_less, prefix, shift, first = 0, 0, key_bits, True
    while shift > 0:
        shift -= bits
        hist = torch.zeros(1 << bits, dtype=torch.int64, device=device)
        histogram(hist, scores, masks, key_bits, shift, bits, prefix, bool(magnitude))
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
    return decode(prefix, key_bits, scores[0].dtype), n_less


def kth_smallest(scores, masks, k, backend=None, magnitude=False):
    """The k-th smallest eligible value over a list of tensors, exactly, without concatenating them.

    scores: list of floating tensors (float32, float64, bfloat16, float16; any shapes; one device).
    masks: None, or a list as long as scores of bool tensors (True = eligible; same shape as the score) or None
    (every entry eligible). k: int, 1 <= k <= number of eligible entries (ValueError naming k otherwise).
    Returns (tau, n_less): tau the k-th smallest eligible value as a Python float (the value of an actual entry;
    -0.0 and +0.0 are one value, returned as +0.0), n_less the number of eligible entries strictly below tau.
    The entries <= tau number at least k; exactly k when tau is not tied. magnitude=True ranks |score| instead
    (tau is then a magnitude), reading the scores themselves: no abs() copy. backend: see nnopt.backends.
    """
    scores = list(scores)
    device = scores[0].device if scores else torch.device("cpu")
    name = backends.resolve(FAMILY, backend, device)
    impl = backends.implementation(FAMILY, name)
    return select(impl.select_histogram, scores, masks, k, RADIX_BITS[name], magnitude)
