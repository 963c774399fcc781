"""Radix-select histogram in Triton: the primitive of the exact k-th smallest value over many tensors.

``select_histogram(hist, scores, masks, key_bits, shift, bits, prefix)`` adds to ``hist`` (int64, 2**bits bins,
on the scores' device) the number of eligible entries (``masks[i]`` True, or every entry when it is None) of
every tensor in ``scores``, per value of the field ``(key >> shift) & (2**bits - 1)`` of their order key,
counting only entries whose key bits above the field, ``key >> (shift + bits)``, equal ``prefix`` (no condition
when the field is the key's top bits). With ``magnitude`` the keys are those of ``|score|``. The order key
(``key_bits`` = 16, 32 or 64) is the float's bit pattern u
(bf16/fp16 as themselves when key_bits is 16; otherwise converted exactly to float32 / float64) with -0.0 taken
as +0.0, then ``~u`` for negative values and ``u | sign`` for the others, NaN as all ones: unsigned key order is
value order. nnopt/prune/_select.py drives the passes; nnopt/reference/select.py is the oracle.

Shapes: any; every score and mask contiguous, one CUDA device (CPU with TRITON_INTERPRET=1). Dtypes: scores
float32, float64, bfloat16, float16 (key_bits 16 needs bf16/fp16, float64 needs 64), masks bool.

Launches: the tensors are grouped by (dtype, has mask) and each group is one launch of the shared multi-tensor
launcher (kernels/_multi_tensor.py): a program walks its chunk of CHUNK entries in BLOCK steps, accumulates a
private 2**bits-bin histogram with `tl.histogram` (int32: a chunk holds < 2**31 entries), and adds its non-zero
bins to ``hist`` with integer atomics: exact and independent of the schedule, no float atomics. With 8-bit fields
(the driver's choice on GPU) a program issues at most 256 atomics per 16384 entries.
"""

import torch
import triton
import triton.language as tl

from . import _multi_tensor
from ._multi_tensor import chunk_bounds, slot_ptr
from ._utils import tl_dtype

_KEY_DTYPE = {16: tl.uint16, 32: tl.uint32, 64: tl.uint64}
_LOAD_AS = {32: tl.float32, 64: tl.float64}
# the largest non-NaN magnitude bit pattern (infinity) of each key format
_INF = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, 32: 0x7F800000, 64: 0x7FF0000000000000}


@triton.jit
def _block(acc, s_ptr, m_ptr, off, bound, shift, hshift, prefix, KEY_BITS: tl.constexpr, KEY: tl.constexpr,
           LOAD_AS: tl.constexpr, INF: tl.constexpr, NBINS: tl.constexpr, CHECK_PREFIX: tl.constexpr,
           HAS_MASK: tl.constexpr, MAGNITUDE: tl.constexpr, BLOCK: tl.constexpr):
    """Adds the histogram of the entries [off, off + BLOCK) below bound to acc."""
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    x = tl.load(s_ptr + offs, mask=m, other=0.0)
    if KEY_BITS != 16:
        x = x.to(LOAD_AS)  # exact for every narrower float
    u = x.to(KEY, bitcast=True)
    ones = ~tl.zeros_like(u)
    sign = ones ^ (ones >> 1)
    if MAGNITUDE:
        u = u & ~sign
    u = tl.where(u == sign, tl.zeros_like(u), u)  # -0.0 -> +0.0
    nan = (u & ~sign) > INF
    key = tl.where((u & sign) != 0, ~u, u | sign)
    key = tl.where(nan, ones, key)
    keep = m
    if CHECK_PREFIX:
        keep = keep & ((key >> hshift) == prefix)
    if HAS_MASK:
        keep = keep & (tl.load(m_ptr + offs, mask=m, other=0) != 0)
    field = ((key >> shift) & (NBINS - 1)).to(tl.int32)
    return acc + tl.histogram(field, NBINS, mask=keep)


@triton.jit
def _histogram_kernel(table, hist, shift_arg, hshift_arg, prefix_arg, S_DTYPE: tl.constexpr,
                      KEY_BITS: tl.constexpr, KEY: tl.constexpr, LOAD_AS: tl.constexpr, INF: tl.constexpr,
                      NBINS: tl.constexpr, CHECK_PREFIX: tl.constexpr, HAS_MASK: tl.constexpr,
                      MAGNITUDE: tl.constexpr, N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    row, start, lim, end = chunk_bounds(table, N_SLOTS, CHUNK, BLOCK)
    s_ptr = slot_ptr(row, 0, S_DTYPE, ALIGNED)
    m_ptr = s_ptr
    if HAS_MASK:
        m_ptr = slot_ptr(row, 1, tl.int8, ALIGNED)
    # shifts and prefix in the key's type (a uint64 key shifted by an int32 would not promote as meant)
    shift = tl.full((), shift_arg, tl.int64).to(KEY)
    hshift = tl.full((), hshift_arg, tl.int64).to(KEY)
    prefix = tl.full((), prefix_arg, tl.int64).to(KEY)
    inf = tl.full((), INF, tl.int64).to(KEY)
    acc = tl.zeros((NBINS,), tl.int32)
    for i in range((lim - start) // BLOCK):
        acc = _block(acc, s_ptr, m_ptr, start + i * BLOCK, lim, shift, hshift, prefix, KEY_BITS, KEY, LOAD_AS, inf,
                     NBINS, CHECK_PREFIX, HAS_MASK, MAGNITUDE, BLOCK)
    for off in range(lim, end, BLOCK):
        acc = _block(acc, s_ptr, m_ptr, off, end, shift, hshift, prefix, KEY_BITS, KEY, LOAD_AS, inf, NBINS,
                     CHECK_PREFIX, HAS_MASK, MAGNITUDE, BLOCK)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist + bins, acc.to(tl.int64), mask=acc != 0, sem="relaxed")


def _check(hist, scores, masks, key_bits, shift, bits):
    if key_bits not in (16, 32, 64):
        raise ValueError(f"select_histogram: key_bits must be 16, 32 or 64, got {key_bits}")
    if not (1 <= bits <= 16 and 0 <= shift and shift + bits <= key_bits):
        raise ValueError(f"select_histogram: need 1 <= bits <= 16 and 0 <= shift <= key_bits - bits, got "
                         f"bits={bits} shift={shift}")
    if hist.dtype != torch.int64 or hist.numel() != 1 << bits or not hist.is_contiguous():
        raise ValueError("select_histogram: hist must be a contiguous int64 tensor of 2**bits elements")
    if len(masks) != len(scores):
        raise ValueError(f"select_histogram: masks has {len(masks)} entries, scores has {len(scores)}")
    for i, (s, m) in enumerate(zip(scores, masks)):
        if s.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"select_histogram: scores[{i}] has unsupported dtype {s.dtype}")
        if key_bits == 16 and s.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"select_histogram: key_bits=16 needs bfloat16 or float16 scores, scores[{i}] is "
                             f"{s.dtype}")
        if key_bits != 64 and s.dtype == torch.float64:
            raise ValueError("select_histogram: float64 scores need key_bits=64")
        if s.device != hist.device or not s.is_contiguous():
            raise ValueError(f"select_histogram: scores[{i}] must be contiguous and on {hist.device}")
        if m is not None and (m.dtype != torch.bool or m.numel() != s.numel() or m.device != hist.device
                              or not m.is_contiguous()):
            raise ValueError(f"select_histogram: masks[{i}] must be a contiguous bool tensor like scores[{i}]")


def select_histogram(hist, scores, masks, key_bits, shift, bits, prefix, magnitude=False):
    """Adds the field histogram of the eligible entries to ``hist`` in place; see the module docstring."""
    _check(hist, scores, masks, key_bits, shift, bits)
    groups = {}
    for s, m in zip(scores, masks):
        if s.numel():
            groups.setdefault((s.dtype, m is not None), []).append((s, m))
    check_prefix = shift + bits < key_bits
    for (dtype, has_mask), pairs in groups.items():
        lists = [[s for s, _ in pairs]] + ([[m for _, m in pairs]] if has_mask else [])
        _multi_tensor.launch(
            _histogram_kernel, lists, [hist, shift, shift + bits if check_prefix else 0, prefix if check_prefix else 0],
            S_DTYPE=tl_dtype(dtype), KEY_BITS=key_bits, KEY=_KEY_DTYPE[key_bits],
            LOAD_AS=_LOAD_AS.get(key_bits, tl_dtype(dtype)), INF=_INF[dtype if key_bits == 16 else key_bits],
            NBINS=1 << bits, CHECK_PREFIX=check_prefix, HAS_MASK=has_mask,
            MAGNITUDE=bool(magnitude))
    return hist
