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

The table depends only on the tensors' addresses and sizes, so it is cached under that key (with the device and
CHUNK): steady-state steps rebuild nothing and copy nothing. On CUDA a new table goes host → device from pinned
memory with `non_blocking=True`, on the launching stream: no host synchronisation.

CHUNK = 16384 and BLOCK = 1024 with 4 warps: 8 elements per thread per step (two 128-bit loads per fp32 stream),
16 steps per program. Apex's multi_tensor_apply hands 65536 elements to a 512-thread block; a 128-thread program
with a quarter of that keeps the same work per thread, and a 100M-parameter model still makes ~6k programs, several
waves on a 132-SM H100, so uneven tensor sizes balance out. The table costs 16 bytes per chunk: ~100 KB per 100M
parameters, built once. Both are module attributes read at each call, so tests can shrink them to exercise
multi-chunk tensors on the interpreter (CHUNK must be a multiple of BLOCK, both powers of two, BLOCK >= 16).
"""

import contextlib
from collections import OrderedDict

import torch
import triton
import triton.language as tl

CHUNK = 16384
BLOCK = 1024
NUM_WARPS = 4
_CACHE_SIZE = 64
_cache = OrderedDict()


def _build_table(lists, device, chunk):
    slots = len(lists)
    rows, chunks = [], []
    for i, p in enumerate(lists[0]):
        n = p.numel()
        if n == 0:
            continue
        t = len(rows)
        rows.append([lst[i].data_ptr() for lst in lists] + [n])
        chunks.extend((t, start) for start in range(0, n, chunk))
    flat = [x for c in chunks for x in c] + [x for r in rows for x in r]
    aligned = all(a % 16 == 0 for r in rows for a in r[:slots])
    host = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    return table, len(chunks), aligned


def _table(lists, device, chunk):
    key = (device, chunk, len(lists), tuple((t.data_ptr(), t.numel()) for lst in lists for t in lst))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    hit = _build_table(lists, device, chunk)
    _cache[key] = hit
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return hit


def launch(kernel, lists, args, **constexprs):
    """Runs `kernel` once over every element of the parallel tensor lists `lists` (list of S lists of T tensors,
    all contiguous, on one device, tensor i of every list having the same numel).

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
        table, n_chunks, aligned = _table(lists, device, chunk)
        if n_chunks == 0:
            return
        args = [table if a is None else a for a in args]
        kernel[(n_chunks,)](table, *args, N_SLOTS=len(lists), ALIGNED=aligned, CHUNK=chunk, BLOCK=block,
                            num_warps=NUM_WARPS, **constexprs)


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
