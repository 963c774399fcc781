"""The one multi-tensor launcher: a whole list of parameters (and their grads, states, masters, masks) in one launch.

A call passes S parallel tensor lists ("slots": param, grad, master, mask, states..., in an order the kernel knows)
of T tensors each. The launcher builds one int64 table and launches one program per CHUNK elements of any tensor:

    rows 0 .. C-1        chunk c:   [tensor index t, start offset]      (2 entries; C = number of programs)
    rows C .. C+T'-1     tensor t:  [address of slot 0, ..., address of slot S-1, numel]   (S + 1 entries)

T' counts the non-empty tensors only (empty ones get no row and no chunk). Each start offset is a multiple of CHUNK.
Chunk rows come first so a program finds its row from `tl.program_id(0)` and the tensor rows from
`tl.num_programs(0)` alone: the kernel takes no table-size arguments, so nothing is specialised on the number of
tensors or chunks. Inside the kernel the addresses become typed pointers
(`tl.load(row + s).to(tl.pointer_type(DTYPE))`), loaded once per program; a program walks its chunk in BLOCK-sized
vector steps, first the full blocks then at most one partial block. Two facts keep the full blocks on 128-bit loads:
their mask bound is a multiple of BLOCK, and when every address is 16-byte aligned (ALIGNED, checked when the table
is built; a view with an odd storage offset turns it off for the call) the pointers carry a `tl.multiple_of` hint.

The table depends only on the tensors' addresses and sizes, so it is cached by them (with the device and CHUNK):
steady-state steps rebuild nothing and copy nothing, and the launcher also checks the lists (see `_table`): in
full, with error messages, on a miss; on a hit by comparing addresses, numels and dtypes with the entry's, one
C-level pass per property over all tensors (a few such passes per call, no per-tensor Python). On CUDA a new
table goes host → device from pinned memory with `non_blocking=True`, on the launching stream: no host
synchronisation.

CHUNK = 16384 and BLOCK = 1024 with 4 warps: 8 elements per thread per step (two 128-bit loads per fp32 stream),
16 steps per program. Apex's multi_tensor_apply hands 65536 elements to a 512-thread block; a 128-thread program
with a quarter of that keeps the same work per thread, and a 100M-parameter model still makes ~6k programs, several
waves on a 132-SM H100, so uneven tensor sizes balance out. The table costs 16 bytes per chunk: ~100 KB per 100M
parameters, built once. Both are module attributes read at each call, so tests can shrink them to exercise
multi-chunk tensors on the interpreter (CHUNK must be a multiple of BLOCK, both powers of two, BLOCK >= 16).
"""

import contextlib
from collections import OrderedDict
from operator import attrgetter

import torch
import triton
import triton.language as tl

CHUNK = 16384
BLOCK = 1024
NUM_WARPS = 4
_CACHE_SIZE = 64
_cache = OrderedDict()

# Per-tensor reads, each mapped over a whole list at C level (no Python frame per tensor).
_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous
_dtype = attrgetter("dtype")
_device = attrgetter("device")


class _Entry:
    """A cached table and what it was built from, slot-major over all S*T tensors: addresses, numels, dtypes."""

    __slots__ = ("aligned", "dtypes", "n_chunks", "numels", "ptrs", "table")

    def __init__(self, ptrs, numels, dtypes, table, n_chunks, aligned):
        self.ptrs, self.numels, self.dtypes = ptrs, numels, dtypes
        self.table, self.n_chunks, self.aligned = table, n_chunks, aligned


def _build_table(ptrs, numels, slots, device, chunk):
    """The table (see the module docstring) from the addresses `ptrs` (slot-major: slot s, tensor i at
    s * T + i) and the T numels, built with a few vectorised ops rather than per-tensor Python."""
    numel = torch.tensor(numels, dtype=torch.int64)
    keep = numel > 0
    addr = torch.tensor(ptrs, dtype=torch.int64).view(slots, len(numels))[:, keep]
    numel = numel[keep]
    counts = (numel + (chunk - 1)) // chunk
    n_chunks = int(counts.sum())
    tensor_of = torch.repeat_interleave(torch.arange(numel.numel()), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    starts = (torch.arange(n_chunks) - first) * chunk
    host = torch.cat([torch.stack([tensor_of, starts], 1).view(-1),
                      torch.cat([addr.t(), numel[:, None]], 1).reshape(-1)])
    aligned = bool((addr % 16 == 0).all())
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    return table, n_chunks, aligned


def _validate(op, names, lists, dtypes, device):
    """Checks every list against slot 0 (one C-level pass per list and property; a Python loop only to find the
    first offender) and returns slot 0's numels. Errors name the op, the list and the index."""
    slots, n = len(lists), len(lists[0])
    names = names or [f"lists[{s}]" for s in range(slots)]
    numels = list(map(_numel, lists[0]))
    for name, lst, dtype in zip(names, lists, dtypes or (None,) * slots):
        if len(lst) != n:
            raise ValueError(f"{op}: {name} has {len(lst)} tensors, {names[0]} has {n}")
        if dtype is not None:
            got = list(map(_dtype, lst))
            if got.count(dtype) != n:
                i = next(i for i, d in enumerate(got) if d != dtype)
                raise TypeError(f"{op}: {name}[{i}] must be {dtype}, got {got[i]}")
        got = list(map(_device, lst))
        if got.count(device) != n:
            i = next(i for i, d in enumerate(got) if d != device)
            raise ValueError(f"{op}: {name}[{i}] is on {got[i]}, {names[0]}[0] on {device}")
        got = list(map(_numel, lst))
        if got != numels:
            i = next(i for i, (a, b) in enumerate(zip(got, numels)) if a != b)
            raise ValueError(f"{op}: {name}[{i}] has {got[i]} elements, {names[0]}[{i}] has {numels[i]}")
        if not all(map(_is_contiguous, lst)):
            i = next(i for i, t in enumerate(lst) if not t.is_contiguous())
            raise ValueError(f"{op}: {name}[{i}] must be contiguous")
    return numels


def _table(lists, device, chunk, op, names, dtypes):
    """The cached table entry for `lists`, after checking them.

    A hit costs four C-level passes over all S*T tensors (addresses, numels, dtypes, contiguity), each checked
    against the entry's list as a whole: no per-tensor Python code and no hashing of addresses. Equal addresses and
    numels are all the table depends on; equal dtypes catch a tensor of another dtype at the same address, and the
    contiguity pass a non-contiguous view starting at a cached address. A non-empty tensor's address fixes its
    device (CPU and every GPU share one virtual address space under CUDA's unified addressing; empty tensors are
    never touched). The key is (device, chunk, T, expected dtypes, first address of each slot): a call whose other
    addresses moved replaces its entry instead of piling up stale ones. A miss validates everything, with error
    messages, then builds."""
    n = len(lists[0])
    flat = []
    for lst in lists:
        flat += lst
    key = ptrs = None
    if len(flat) == n * len(lists):
        try:
            ptrs = list(map(_ptr, flat))
        except (RuntimeError, TypeError):  # a tensor without storage, or not a tensor: _validate says which
            ptrs = None
    if ptrs is not None:
        key = (device, chunk, n, tuple(dtypes or ()), *ptrs[::n])
        hit = _cache.get(key)
        if (hit is not None and hit.ptrs == ptrs and list(map(_numel, flat)) == hit.numels
                and list(map(_dtype, flat)) == hit.dtypes and all(map(_is_contiguous, flat))):
            _cache.move_to_end(key)
            return hit
    numels = _validate(op, names, lists, dtypes, device)
    if ptrs is None:
        ptrs = list(map(_ptr, flat))
        key = (device, chunk, n, tuple(dtypes or ()), *ptrs[::n])
    entry = _Entry(ptrs, numels * len(lists), list(map(_dtype, flat)),
                   *_build_table(ptrs, numels, len(lists), device, chunk))
    _cache[key] = entry
    _cache.move_to_end(key)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return entry


def launch(kernel, lists, args, *, op="launch", names=None, dtypes=None, **constexprs):
    """Runs `kernel` once over every element of the parallel tensor lists `lists` (list of S lists of T >= 1
    tensors, all contiguous, on lists[0][0]'s device, tensor i of every list having the same numel), checking
    all of that (and, where `dtypes` gives one for a slot, its dtype); errors name `op` and the lists' `names`.

    The kernel's signature starts with (table, *args) and ends with the constexprs
    `N_SLOTS, ALIGNED, CHUNK, BLOCK`; `args` are its runtime arguments and `constexprs` its other compile-time ones.
    A None in `args` (an absent optional tensor, whose constexpr flag keeps the kernel off it) is passed as the table.
    """
    chunk, block = CHUNK, BLOCK
    if block < 16 or block & (block - 1) or chunk % block:
        raise ValueError(f"CHUNK ({chunk}) must be a multiple of BLOCK ({block}), a power of two >= 16")
    device = lists[0][0].device
    # Triton launches on the current device, and the table copy goes to that device's current stream
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        entry = _table(lists, device, chunk, op, names, dtypes)
        if entry.n_chunks == 0:
            return
        table = entry.table
        args = [table if a is None else a for a in args]
        # No fused multiply-add contraction: results round op for op like the reference, the interpreter and the
        # CUDA build (-fmad=false); the steps are memory-bound, so the FMAs would buy nothing.
        kernel[(entry.n_chunks,)](table, *args, N_SLOTS=len(lists), ALIGNED=entry.aligned, CHUNK=chunk,
                                  BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False, **constexprs)


@triton.jit
def chunk_bounds(table, N_SLOTS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor row (a pointer to its S addresses and numel), and its chunk's [start, lim, end):
    full BLOCKs from start to lim (lim - start a multiple of BLOCK), then at most one partial block to end."""
    pid = tl.program_id(0).to(tl.int64)
    n_chunks = tl.num_programs(0).to(tl.int64)
    t = tl.load(table + 2 * pid)
    start = tl.multiple_of(tl.load(table + 2 * pid + 1), CHUNK)
    row = table + 2 * n_chunks + t * (N_SLOTS + 1)
    numel = tl.load(row + N_SLOTS)
    end = tl.minimum(start + CHUNK, numel)
    lim = start + ((end - start) // BLOCK) * BLOCK
    return row, start, lim, end


@triton.jit
def slot_ptr(row, SLOT: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed base pointer of slot SLOT of this program's tensor."""
    ptr = tl.load(row + SLOT).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # on the pointer, not the integer: the int-to-pointer cast drops the integer's divisibility
        ptr = tl.multiple_of(ptr, 16)
    return ptr
