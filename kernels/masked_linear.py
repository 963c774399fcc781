"""Block-sparse masked linear products in Triton: the forward pass and both gradients of y = x (W ⊙ mask)ᵀ + b.

Same names, signatures and math as nnopt.reference.masked_linear (the oracle):

    masked_linear(x, weight, mask, bias, layout)   y  [M, N] = x (W ⊙ mask)ᵀ + bias
    masked_linear_dx(dy, weight, mask, layout)     dx [M, K] = dy (W ⊙ mask)
    masked_linear_dw(dy, x, mask, layout)          dW [N, K] = (dyᵀ x) ⊙ mask

Shapes: x [M, K], dy [M, N], weight and mask [N, K], bias [N] or None; M may be 0. Dtypes: x, dy, weight and bias
one of float32, bfloat16, float16 (one dtype per call; float64 is refused), mask bool; results are new tensors in
that dtype. Every tensor contiguous, on one CUDA device (CPU with TRITON_INTERPRET=1).

``layout`` is the nnopt.nn.layout.BlockLayout of ``mask``: the mask cut into block_n × block_k tiles (block sizes
16, 32, 64 or 128; edge tiles clipped), with the non-empty tiles listed per block row (CSR: row_ptr, col_idx), per
block column (CSC: col_ptr, row_idx, t_perm mapping a CSC entry to its CSR index) and a flag per tile that it is
entirely true (full, CSR order). Work is done on the listed tiles only, so the layout must be the one built from
this mask: an entry outside the listed tiles counts as masked. The kernel tile is the layout tile
(BLOCK_N = block_n, BLOCK_K = block_k); BLOCK_M comes from a per-GPU table.

Kernels, each accumulating in float32 with `tl.dot` and rounding once (to nearest even) on the store:
  forward  one program per (BLOCK_M rows of x, block row j): walks row j's tiles in CSR order, acc += x_tile W_tileᵀ;
           the bias is added in the epilogue. A block row with no tile stores the bias (or 0).
  dx       one program per (BLOCK_M rows of dy, block column c): walks column c's tiles in CSC order,
           acc += dy_tile W_tile. A block column with no tile stores 0.
  dW       one program per listed tile, in CSC order (programs running together share the columns of x they read):
           the sampled product dyᵀ x on that tile, reduced over M in BLOCK_M steps inside the program (deterministic:
           no split over M, no atomics), masked and stored; dW starts as zeros, so unlisted tiles stay exactly 0.
Inside a tile that is not full the mask tile is loaded and masked weights are replaced with 0 by `tl.where` (a NaN
or inf there is ignored, as in the reference); for a full tile the mask load is predicated off (no memory traffic).
The dW tile is masked the same way before its store, so dW is exactly 0 wherever the mask is false.

Decode shapes (M <= DECODE_ROWS): one program per block row leaves most of the GPU idle and each program walks a
long row of tiles alone, so the forward splits each block row's tiles over SPLIT programs (split-K): program
(j, s) takes tiles s, s + SPLIT, ... of row j, with x padded to a 16-row dot, and stores its partial sum [M, block_n]
in float32 to a workspace [SPLIT, M, N]; a second kernel adds the SPLIT partials in a fixed order (deterministic,
no atomics), adds the bias and rounds once. Each kept tile of W is read once.

Numerics: float32 operands use input_precision="ieee" (exact fp32 products, no TF32). bfloat16/float16 operands
go to the tensor cores with exact products and float32 accumulation (input_precision only governs fp32 operands).
Triton's interpreter multiplies bfloat16 tiles as their raw bits, so under it bf16 tiles are widened to float32
before the dot (exact: a bf16 product is exact in fp32).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from ._utils import cast, tl_dtype

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCKS = (16, 32, 64, 128)  # tl.dot needs every tile side >= 16; powers of two for tl.arange

# Launch configuration tuned per GPU: torch.cuda.get_device_capability -> {(operand kind, max(block_n, block_k)):
# (BLOCK_M, num_warps, num_stages)}. A deterministic table, not autotuning: the choice never depends on timing noise.
# sm_90 (H100/H200, 227 KB shared memory per block): 16-bit tiles take BLOCK_M = 128 (a full wgmma M extent per
# warpgroup) and as many pipeline stages as the x and W tiles of a stage leave room for (128×128 bf16: 64 KB a stage,
# 3 stages); fp32 ("ieee", FMA path) keeps BLOCK_M small so the accumulator and operands stay in registers.
# The entries are starting points sized from each kernel's shared-memory footprint (every one compiles for sm_90
# within the limit), not yet timed on the card: measured values from bench/bench_masked_linear.py replace them.
_TUNED = {
    (9, 0): {
        ("16bit", 16): (128, 4, 4), ("16bit", 32): (128, 4, 4), ("16bit", 64): (128, 4, 3), ("16bit", 128): (128, 8, 3),
        ("fp32", 16): (64, 4, 3), ("fp32", 32): (64, 4, 3), ("fp32", 64): (64, 4, 2), ("fp32", 128): (32, 8, 2),
    },
}
# Any other GPU: sized to fit the 99 KB a block gets on sm_86/sm_89 (the smallest of sm_80+) at every block size:
# two stages, one for 128-wide fp32 tiles (their W tile alone is 64 KB).
_DEFAULT = {
    ("16bit", 16): (64, 4, 2), ("16bit", 32): (64, 4, 2), ("16bit", 64): (64, 4, 2), ("16bit", 128): (64, 8, 2),
    ("fp32", 16): (32, 4, 2), ("fp32", 32): (32, 4, 2), ("fp32", 64): (32, 4, 2), ("fp32", 128): (16, 8, 1),
}
# The interpreter runs each program in Python: the smallest tile keeps the test shapes fast.
_INTERPRETER = (16, 4, 1)
DECODE_ROWS = 16  # the forward takes the split-K kernels up to this many rows of x (one 16-row dot)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _read_mask(inb, is_full):
    """Where the mask tile must be read: in range, and only when the tile is not full. is_full is compared as a
    block: the interpreter types (block bool) & (scalar bool) as int8, which tl.load rejects as a mask."""
    return inb & (tl.zeros(inb.shape, tl.int8) == is_full)


@triton.jit
def _masked_tile(ptr, m_ptr, rows, cols, N, K, is_full):
    """The [len(rows), len(cols)] tile of the [N, K] matrix at ptr with 0 where out of range or where the mask is
    false (the mask is read only when the tile is not full). rows/cols are int64 row and column indices."""
    offs = rows[:, None] * K + cols[None, :]
    inb = (rows[:, None] < N) & (cols[None, :] < K)
    t = tl.load(ptr + offs, mask=inb, other=0.0)
    keep = tl.load(m_ptr + offs, mask=_read_mask(inb, is_full), other=1)
    return tl.where(keep != 0, t, tl.zeros_like(t))


@triton.jit
def _forward_kernel(x_ptr, w_ptr, m_ptr, b_ptr, y_ptr, row_ptr, col_idx, full, M, N, K, num_m_tiles,
                    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % num_m_tiles  # consecutive programs share block row j: its W tiles are read from L2
    j = pid // num_m_tiles
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    start = tl.load(row_ptr + j)
    end = tl.load(row_ptr + j + 1)
    for p in range(start, end):
        rk = tl.load(col_idx + p).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_in[:, None] & (rk[None, :] < K), other=0.0)
        w = _masked_tile(w_ptr, m_ptr, rn, rk, N, K, tl.load(full + p))
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], cast(acc, y_ptr.dtype.element_ty),
             mask=m_in[:, None] & (rn[None, :] < N))


@triton.jit
def _dx_kernel(dy_ptr, w_ptr, m_ptr, dx_ptr, col_ptr, row_idx, t_perm, full, M, N, K, num_m_tiles,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % num_m_tiles
    c = pid // num_m_tiles
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = c * BLOCK_K + tl.arange(0, BLOCK_K)
    m_in = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    start = tl.load(col_ptr + c)
    end = tl.load(col_ptr + c + 1)
    for q in range(start, end):
        rn = tl.load(row_idx + q).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rm[:, None] * N + rn[None, :], mask=m_in[:, None] & (rn[None, :] < N), other=0.0)
        w = _masked_tile(w_ptr, m_ptr, rn, rk, N, K, tl.load(full + tl.load(t_perm + q)))
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], cast(acc, dx_ptr.dtype.element_ty),
             mask=m_in[:, None] & (rk[None, :] < K))


@triton.jit
def _dw_kernel(dy_ptr, x_ptr, m_ptr, dw_ptr, col_idx, row_idx, t_perm, full, M, N, K, DOT_DTYPE: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    q = tl.program_id(0).to(tl.int64)  # CSC index of the tile
    p = tl.load(t_perm + q)
    rn = tl.load(row_idx + q).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.load(col_idx + p).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_in = rn < N
    k_in = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = tl.arange(0, BLOCK_M).to(tl.int64) + m0
        m_in = rm < M
        dy = tl.load(dy_ptr + rm[:, None] * N + rn[None, :], mask=m_in[:, None] & n_in[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=PRECISION)
    offs = rn[:, None] * K + rk[None, :]
    inb = n_in[:, None] & k_in[None, :]
    keep = tl.load(m_ptr + offs, mask=_read_mask(inb, tl.load(full + p)), other=1)
    acc = tl.where(keep != 0, acc, 0.0)
    tl.store(dw_ptr + offs, cast(acc, dw_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _decode_partial_kernel(x_ptr, w_ptr, m_ptr, part_ptr, row_ptr, col_idx, full, M, N, K, SPLIT,
                           DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    start = tl.load(row_ptr + j)
    end = tl.load(row_ptr + j + 1)
    for p in range(start + s, end, SPLIT):
        rk = tl.load(col_idx + p).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_in[:, None] & (rk[None, :] < K), other=0.0)
        w = _masked_tile(w_ptr, m_ptr, rn, rk, N, K, tl.load(full + p))
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    tl.store(part_ptr + s.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :], acc,
             mask=m_in[:, None] & (rn[None, :] < N))


@triton.jit
def _decode_reduce_kernel(part_ptr, b_ptr, y_ptr, M, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M * N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, SPLIT):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + s * M * N + offs, mask=inb, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=inb, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, cast(acc, y_ptr.dtype.element_ty), mask=inb)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _interpreting():
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; before it, the environment variable itself
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _table(device_index):
    return _TUNED.get(torch.cuda.get_device_capability(device_index), _DEFAULT)


def _config(dtype, layout, device):
    """(BLOCK_M, num_warps, num_stages, DOT_DTYPE, PRECISION) for this call."""
    interp = device.type != "cuda"
    if dtype == torch.float32:
        kind, dot_dtype, precision = "fp32", tl.float32, "ieee"
    else:
        # 16-bit operands take the tensor cores whatever input_precision says (it governs fp32 operands only);
        # "ieee" everywhere keeps TF32 off every path. Under the interpreter bf16 is widened to fp32 first (it
        # would multiply the raw bits).
        kind, precision = "16bit", "ieee"
        dot_dtype = tl.float32 if interp and dtype == torch.bfloat16 else tl_dtype(dtype)
    if interp:
        block_m, warps, stages = _INTERPRETER
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        block_m, warps, stages = _table(index)[(kind, max(layout.block_n, layout.block_k))]
    return block_m, warps, stages, dot_dtype, precision


def _check_tensor(op, name, t, dtype, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check(op, first_name, first, feature_dim, mask, layout):
    """Checks the call's first operand (x or dy: 2-D, a supported dtype, a usable device, as many features as the
    mask has along feature_dim), the mask and the layout; returns (dtype, device, N, K, launch config). The other
    operands are checked against these with _check_tensor."""
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise ValueError(f"{op}: {first_name} must be a 2-D tensor [M, {('out', 'in')[feature_dim]}_features]")
    dtype, device = first.dtype, first.device
    if dtype == torch.float64:
        raise TypeError(f"{op}: float64 is not supported by the Triton kernels ({first_name} is float64); "
                        "use float32, bfloat16 or float16, or the 'cpu'/'torch' backend")
    if dtype not in _DTYPES:
        raise TypeError(f"{op}: {first_name} must be float32, bfloat16 or float16, got {dtype}")
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"{op}: {first_name} must be a CUDA tensor (CPU tensors need TRITON_INTERPRET=1), got "
                         f"{device}")
    if not first.is_contiguous():
        raise ValueError(f"{op}: {first_name} must be contiguous")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"{op}: mask must be a 2-D bool tensor [out_features, in_features]")
    n, k = mask.shape
    if first.shape[1] != mask.shape[feature_dim]:
        raise ValueError(f"{op}: {first_name} has {first.shape[1]} features, but mask is [{n}, {k}] "
                         f"(expects {mask.shape[feature_dim]})")
    _check_tensor(op, "mask", mask, torch.bool, (n, k), device)
    for attr in ("shape", "block_n", "block_k", "row_ptr", "col_idx", "col_ptr", "row_idx", "t_perm", "full"):
        if not hasattr(layout, attr):
            raise TypeError(f"{op}: layout must be a nnopt.nn.layout.BlockLayout, got {type(layout).__name__}")
    if tuple(layout.shape) != (n, k):
        raise ValueError(f"{op}: layout is for a {list(layout.shape)} mask, but mask is [{n}, {k}]")
    if layout.block_n not in _BLOCKS or layout.block_k not in _BLOCKS:
        raise ValueError(f"{op}: layout blocks must be 16, 32, 64 or 128 on each side for the Triton kernels, got "
                         f"{layout.block_n}x{layout.block_k}")
    nb, kb = -(-n // layout.block_n), -(-k // layout.block_k)
    nnzb = layout.col_idx.numel()
    for name, numel, dt in (("row_ptr", nb + 1, torch.int32), ("col_idx", nnzb, torch.int32),
                            ("col_ptr", kb + 1, torch.int32), ("row_idx", nnzb, torch.int32),
                            ("t_perm", nnzb, torch.int32), ("full", nnzb, torch.bool)):
        _check_tensor(op, f"layout.{name}", getattr(layout, name), dt, (numel,), device)
    return dtype, device, n, k, _config(dtype, layout, device)


def masked_linear(x, weight, mask, bias, layout):
    """y [M, N] = x (W ⊙ mask)ᵀ + bias over the layout's tiles; x [M, K], weight/mask [N, K], bias [N] or None."""
    op = "masked_linear"
    dtype, device, n, k, (block_m, warps, stages, dot_dtype, precision) = _check(
        op, "x", x, 1, mask, layout)
    _check_tensor(op, "weight", weight, dtype, (n, k), device)
    if bias is not None:
        _check_tensor(op, "bias", bias, dtype, (n,), device)
    m = x.shape[0]
    if 0 < m <= DECODE_ROWS and layout.col_idx.numel() > 0:
        return _decode(x, weight, mask, bias, layout, n, k, warps, stages, dot_dtype, precision)
    y = torch.empty((m, n), dtype=dtype, device=device)
    num_m_tiles = triton.cdiv(m, block_m)
    grid = (num_m_tiles * (layout.row_ptr.numel() - 1),)
    if grid[0] == 0:
        return y
    _forward_kernel[grid](x, weight, mask.view(torch.int8), bias if bias is not None else y, y, layout.row_ptr,
                          layout.col_idx, layout.full.view(torch.int8), m, n, k, num_m_tiles,
                          HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=block_m,
                          BLOCK_N=layout.block_n, BLOCK_K=layout.block_k, num_warps=warps, num_stages=stages)
    return y


def _split(layout, device):
    """Programs per block row: enough programs to fill the GPU (4 per SM), at most one per tile of the longest
    row; 2 under the interpreter (the reduction is exercised, the programs stay few)."""
    nb = layout.row_ptr.numel() - 1
    longest = int((layout.row_ptr[1:] - layout.row_ptr[:-1]).max()) if nb else 1
    if device.type != "cuda":
        return max(1, min(2, longest))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(longest, triton.cdiv(4 * sms, max(nb, 1))))


def _decode(x, weight, mask, bias, layout, n, k, warps, stages, dot_dtype, precision):
    """The split-K forward for M <= DECODE_ROWS rows (see the module docstring)."""
    m = x.shape[0]
    split = _split(layout, x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    nb = layout.row_ptr.numel() - 1
    _decode_partial_kernel[(nb, split)](x, weight, mask.view(torch.int8), part, layout.row_ptr, layout.col_idx,
                                        layout.full.view(torch.int8), m, n, k, split, DOT_DTYPE=dot_dtype,
                                        PRECISION=precision, BLOCK_M=16, BLOCK_N=layout.block_n,
                                        BLOCK_K=layout.block_k, num_warps=min(warps, 4), num_stages=stages)
    # rows of a block row with no tile (and programs past a short row's tiles) stored zeros: part is complete
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block = 1024
    _decode_reduce_kernel[(triton.cdiv(m * n, block),)](part, bias if bias is not None else y, y, m, n, split,
                                                        HAS_BIAS=bias is not None, BLOCK=block)
    return y


def masked_linear_dx(dy, weight, mask, layout):
    """dx [M, K] = dy (W ⊙ mask) over the layout's tiles; dy [M, N], weight/mask [N, K]."""
    op = "masked_linear_dx"
    dtype, device, n, k, (block_m, warps, stages, dot_dtype, precision) = _check(
        op, "dy", dy, 0, mask, layout)
    _check_tensor(op, "weight", weight, dtype, (n, k), device)
    m = dy.shape[0]
    dx = torch.empty((m, k), dtype=dtype, device=device)
    num_m_tiles = triton.cdiv(m, block_m)
    grid = (num_m_tiles * (layout.col_ptr.numel() - 1),)
    if grid[0] == 0:
        return dx
    _dx_kernel[grid](dy, weight, mask.view(torch.int8), dx, layout.col_ptr, layout.row_idx, layout.t_perm,
                     layout.full.view(torch.int8), m, n, k, num_m_tiles, DOT_DTYPE=dot_dtype, PRECISION=precision,
                     BLOCK_M=block_m, BLOCK_N=layout.block_n, BLOCK_K=layout.block_k, num_warps=warps,
                     num_stages=stages)
    return dx


def masked_linear_dw(dy, x, mask, layout):
    """dW [N, K] = (dyᵀ x) ⊙ mask on the layout's tiles, exactly 0 elsewhere; dy [M, N], x [M, K], mask [N, K]."""
    op = "masked_linear_dw"
    dtype, device, n, k, (block_m, warps, stages, dot_dtype, precision) = _check(
        op, "dy", dy, 0, mask, layout)
    _check_tensor(op, "x", x, dtype, (dy.shape[0], k), device)
    m = dy.shape[0]
    dw = torch.zeros((n, k), dtype=dtype, device=device)
    nnzb = layout.col_idx.numel()
    if m == 0 or nnzb == 0:
        return dw
    _dw_kernel[(nnzb,)](dy, x, mask.view(torch.int8), dw, layout.col_idx, layout.row_idx, layout.t_perm,
                        layout.full.view(torch.int8), m, n, k, DOT_DTYPE=dot_dtype, PRECISION=precision,
                        BLOCK_M=block_m, BLOCK_N=layout.block_n, BLOCK_K=layout.block_k, num_warps=warps,
                        num_stages=stages)
    return dw
