"""Adafactor (torch.optim.Adafactor's math; reference: `nnopt.reference.fused_optim.adafactor_step`) in Triton:
every tensor of a call in four launches, the per-tensor scalars formed by a few device ops between them (no host
read, no Python loop over tensors once the tables are cached).

A parameter of 2+ dims is B matrices R x C (its last two dims); `row_vars[i]` holds B*R entries and `col_vars[i]`
B*C. A parameter of fewer dims ("vector") keeps its full variance in `row_vars[i]` and an empty `col_vars[i]`; its
elements are walked as rows of BLOCK_C. Work is split in tiles of at most BLOCK_R rows of one matrix, every column:

    1. stats     per tile: row sums of g² -> row_var = lerp(row_var, ||g_row||²/C, w) (a tile owns whole rows),
                 column partial sums of g² (one C-vector per tile), sum of p²;
    2. columns   per matrix: column sums over its tiles (in tile order) -> col_var = lerp(col_var, ||g_col||²/R, w),
                 and max(mean(row_var), eps1);
       device ops: alpha = max(eps2, ||p||/sqrt(numel)) * rho per tensor;
    3. norms     per tile: u = g / sqrt(max(var, eps1²)) with var = row_var*col_var/mean (vectors: variance updated
                 here), sum of u²;
       device ops: coef = -alpha / max(1, RMS(u)/d) per tensor;
    4. update    per tile: p = p*(1 - lr*wd) + coef*u, L1, mask.

All reductions are two-stage and deterministic (fixed tiles; per-tensor sums from a float64 cumulative sum over
tiles). Dtypes: params/grads float32, float64, bfloat16, float16 (one per call); states float32 with masters, else
the params' dtype; masks bool. Math in float32 (float64 for float64), IEEE division and sqrt. found_inf (nonzero)
keeps every store off; grad_scale, lr_tensor and the `step` count are read on the device.
"""

import torch
import triton
import triton.language as tl

from ._utils import cast, compute_dtype, div_rn, lerp, sqrt_rn, tl_dtype
from .fused_optim import _interpreting

BLOCK_R = 16  # rows per tile
BLOCK_C = 64  # columns per vector step (and the row length of vector parameters)
_T_COLS = 10  # tensor table: p, g, master, mask, row_var, col_var, numel, R, C, factored
_TILE_COLS = 5  # tile table: tensor, first row, end row, column-partial offset, matrix index
_MAT_COLS = 4  # matrix table: tensor, batch index, first tile, end tile
_cache = {}


@triton.jit
def _tile_setup(tiles, tensors, inf_ptr, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_INF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + _TILE_COLS * pid)
    r0 = tl.load(tiles + _TILE_COLS * pid + 1)
    r1 = tl.load(tiles + _TILE_COLS * pid + 2)
    mat = tl.load(tiles + _TILE_COLS * pid + 4)
    row = tensors + _T_COLS * t
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    w_ptr = p_ptr
    if HAS_MASTER:
        w_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    k_ptr = p_ptr
    if HAS_MASK:
        k_ptr = tl.load(row + 3).to(tl.pointer_type(tl.int8))
    rv_ptr = tl.load(row + 4).to(tl.pointer_type(S_DTYPE))
    cv_ptr = tl.load(row + 5).to(tl.pointer_type(S_DTYPE))
    numel = tl.load(row + 6)
    R = tl.load(row + 7)
    C = tl.load(row + 8)
    factored = tl.load(row + 9) != 0
    if HAS_INF:  # a skipped step: empty tiles, so nothing is stored
        r1 = tl.where(tl.load(inf_ptr) != 0, r0, r1)
    return pid, t, r0, r1, mat, p_ptr, g_ptr, w_ptr, k_ptr, rv_ptr, cv_ptr, numel, R, C, factored


@triton.jit
def _load_pg(p_ptr, g_ptr, w_ptr, k_ptr, idx, m, scale_ptr, CD: tl.constexpr, HAS_MASTER: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """(p, g, keep) in the compute dtype: p from the master, g unscaled, negated when maximizing, 0 where masked."""
    if HAS_MASTER:
        p = tl.load(w_ptr + idx, mask=m, other=0.0).to(CD)
    else:
        p = tl.load(p_ptr + idx, mask=m, other=0.0).to(CD)
    g = tl.load(g_ptr + idx, mask=m, other=0.0).to(CD)
    if HAS_SCALE:
        g = div_rn(g, tl.load(scale_ptr).to(CD), CD)
    if MAXIMIZE:
        g = -g
    keep = m
    if HAS_MASK:
        keep = m & (tl.load(k_ptr + idx, mask=m, other=0) != 0)
        g = tl.where(keep, g, 0.0)
    return p, g, keep


@triton.jit
def _mean_sq(sum_sq, n, CD: tl.constexpr):
    """torch.norm (rounded to CD) squared, divided by n."""
    norm = sqrt_rn(sum_sq, CD)
    return div_rn(norm * norm, n.to(CD), CD)


@triton.jit
def _update(var, g, eps1_sq, CD: tl.constexpr):
    """g / sqrt(max(var, eps1²)) as torch: clamp (NaN kept), rsqrt as 1/sqrt, multiply."""
    v = tl.where(var < eps1_sq, eps1_sq, var)
    return div_rn(tl.full(v.shape, 1.0, CD), sqrt_rn(v, CD), CD) * g


@triton.jit
def _stats_kernel(tiles, tensors, sc_ptr, scale_ptr, inf_ptr, colpart_ptr, ppart_ptr, P_DTYPE: tl.constexpr,
                  S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr):
    pid, t, r0, r1, mat, p_ptr, g_ptr, w_ptr, k_ptr, rv_ptr, cv_ptr, numel, R, C, factored = _tile_setup(
        tiles, tensors, inf_ptr, P_DTYPE, S_DTYPE, HAS_MASTER, HAS_MASK, HAS_INF)
    col_off = tl.load(tiles + _TILE_COLS * pid + 3)
    w = tl.load(sc_ptr).to(CD)
    rows = r0 + tl.arange(0, BR).to(tl.int64)
    rmask = rows < r1
    rs = tl.zeros((BR,), CD)
    pacc = tl.zeros((BR, BC), CD)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC).to(tl.int64)
        idx = rows[:, None] * C + cols[None, :]
        m = rmask[:, None] & (cols < C)[None, :] & (idx < numel)
        p, g, keep = _load_pg(p_ptr, g_ptr, w_ptr, k_ptr, idx, m, scale_ptr, CD, HAS_MASTER, HAS_MASK, HAS_SCALE,
                              MAXIMIZE)
        g2 = g * g
        rs += tl.sum(g2, 1)
        if factored:
            tl.store(colpart_ptr + col_off + cols, tl.sum(g2, 0), mask=cols < C)
        pk = tl.where(keep, p, 0.0)
        pacc += pk * pk
    tl.store(ppart_ptr + pid, tl.sum(tl.sum(pacc, 1), 0).to(tl.float64))
    if factored:
        rv = tl.load(rv_ptr + rows, mask=rmask, other=0.0).to(CD)
        tl.store(rv_ptr + rows, cast(lerp(rv, _mean_sq(rs, C, CD), w), S_DTYPE), mask=rmask)


@triton.jit
def _columns_kernel(mats, tiles, tensors, sc_ptr, inf_ptr, colpart_ptr, rmean_ptr, S_DTYPE: tl.constexpr,
                    CD: tl.constexpr, HAS_INF: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(mats + _MAT_COLS * pid)
    b = tl.load(mats + _MAT_COLS * pid + 1)
    k0 = tl.load(mats + _MAT_COLS * pid + 2)
    k1 = tl.load(mats + _MAT_COLS * pid + 3)
    row = tensors + _T_COLS * t
    rv_ptr = tl.load(row + 4).to(tl.pointer_type(S_DTYPE))
    cv_ptr = tl.load(row + 5).to(tl.pointer_type(S_DTYPE))
    R = tl.load(row + 7)
    C = tl.load(row + 8)
    c_end = C
    if HAS_INF:  # a skipped step stores no column
        c_end = tl.where(tl.load(inf_ptr) != 0, 0, C)
    w = tl.load(sc_ptr).to(CD)
    eps1 = tl.load(sc_ptr + 3).to(CD)
    for c0 in range(0, c_end, BC):
        cols = c0 + tl.arange(0, BC).to(tl.int64)
        cm = cols < C
        acc = tl.zeros((BC,), CD)
        for k in range(k0, k1):
            off = tl.load(tiles + _TILE_COLS * k + 3)
            acc += tl.load(colpart_ptr + off + cols, mask=cm, other=0.0)
        cv = tl.load(cv_ptr + b * C + cols, mask=cm, other=0.0).to(CD)
        tl.store(cv_ptr + b * C + cols, cast(lerp(cv, _mean_sq(acc, R, CD), w), S_DTYPE), mask=cm)
    racc = tl.zeros((BC,), CD)
    for q in range(0, R, BC):
        rr = q + tl.arange(0, BC).to(tl.int64)
        racc += tl.load(rv_ptr + b * R + rr, mask=rr < R, other=0.0).to(CD)
    mean = div_rn(tl.sum(racc, 0), R.to(CD), CD)
    tl.store(rmean_ptr + pid, tl.where(mean < eps1, eps1, mean).to(tl.float64))


@triton.jit
def _tile_update(p_ptr, g_ptr, w_ptr, k_ptr, rv_ptr, cv_ptr, rows, rmask, c0, C, numel, R, r0, factored, rm, w,
                 eps1_sq, scale_ptr, CD: tl.constexpr, S_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                 HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, STORE_VAR: tl.constexpr,
                 BC: tl.constexpr):
    """One [BR, BC] block: (p, u, keep, idx, m); vectors update their variance when STORE_VAR, else read it."""
    cols = c0 + tl.arange(0, BC).to(tl.int64)
    idx = rows[:, None] * C + cols[None, :]
    m = rmask[:, None] & (cols < C)[None, :] & (idx < numel)
    p, g, keep = _load_pg(p_ptr, g_ptr, w_ptr, k_ptr, idx, m, scale_ptr, CD, HAS_MASTER, HAS_MASK, HAS_SCALE,
                          MAXIMIZE)
    if factored:
        b = r0 // R
        rv = tl.load(rv_ptr + rows, mask=rmask, other=0.0).to(CD)
        cv = tl.load(cv_ptr + b * C + cols, mask=cols < C, other=0.0).to(CD)
        var = div_rn(rv[:, None] * cv[None, :], rm, CD)
    else:
        var = tl.load(rv_ptr + idx, mask=m, other=0.0).to(CD)
        if STORE_VAR:
            var = lerp(var, g * g, w)
            if HAS_MASK:
                var = tl.where(keep, var, 0.0)
            tl.store(rv_ptr + idx, cast(var, S_DTYPE), mask=m)
    u = tl.where(m, _update(var, g, eps1_sq, CD), 0.0)
    return p, u, keep, idx, m


@triton.jit
def _norms_kernel(tiles, tensors, sc_ptr, scale_ptr, inf_ptr, rmean_ptr, upart_ptr, P_DTYPE: tl.constexpr,
                  S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr):
    pid, t, r0, r1, mat, p_ptr, g_ptr, w_ptr, k_ptr, rv_ptr, cv_ptr, numel, R, C, factored = _tile_setup(
        tiles, tensors, inf_ptr, P_DTYPE, S_DTYPE, HAS_MASTER, HAS_MASK, HAS_INF)
    w = tl.load(sc_ptr).to(CD)
    eps1_sq = tl.load(sc_ptr + 4).to(CD)
    rm = tl.load(rmean_ptr + tl.maximum(mat, 0)).to(CD)
    rows = r0 + tl.arange(0, BR).to(tl.int64)
    rmask = rows < r1
    uacc = tl.zeros((BR, BC), CD)
    for c0 in range(0, C, BC):
        p, u, keep, idx, m = _tile_update(p_ptr, g_ptr, w_ptr, k_ptr, rv_ptr, cv_ptr, rows, rmask, c0, C, numel, R,
                                          r0, factored, rm, w, eps1_sq, scale_ptr, CD, S_DTYPE, HAS_MASTER,
                                          HAS_MASK, HAS_SCALE, MAXIMIZE, True, BC)
        uacc += u * u
    tl.store(upart_ptr + pid, tl.sum(tl.sum(uacc, 1), 0).to(tl.float64))


@triton.jit
def _apply_kernel(tiles, tensors, sc_ptr, scale_ptr, inf_ptr, rmean_ptr, coef_ptr, P_DTYPE: tl.constexpr,
                  S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr):
    pid, t, r0, r1, mat, p_ptr, g_ptr, w_ptr, k_ptr, rv_ptr, cv_ptr, numel, R, C, factored = _tile_setup(
        tiles, tensors, inf_ptr, P_DTYPE, S_DTYPE, HAS_MASTER, HAS_MASK, HAS_INF)
    w = tl.load(sc_ptr).to(CD)
    decay = tl.load(sc_ptr + 1).to(CD)
    l1_thr = tl.load(sc_ptr + 2).to(CD)
    eps1_sq = tl.load(sc_ptr + 4).to(CD)
    rm = tl.load(rmean_ptr + tl.maximum(mat, 0)).to(CD)
    coef = tl.load(coef_ptr + t).to(CD)
    rows = r0 + tl.arange(0, BR).to(tl.int64)
    rmask = rows < r1
    for c0 in range(0, C, BC):
        p, u, keep, idx, m = _tile_update(p_ptr, g_ptr, w_ptr, k_ptr, rv_ptr, cv_ptr, rows, rmask, c0, C, numel, R,
                                          r0, factored, rm, w, eps1_sq, scale_ptr, CD, S_DTYPE, HAS_MASTER,
                                          HAS_MASK, HAS_SCALE, MAXIMIZE, False, BC)
        p = tl.fma(coef, u, p * decay)
        shrunk = tl.maximum(tl.abs(p) - l1_thr, 0.0)
        p = tl.where(p > 0, shrunk, tl.where(p < 0, -shrunk, p))
        if HAS_MASK:
            p = tl.where(keep, p, 0.0)
        if HAS_MASTER:
            tl.store(w_ptr + idx, p.to(tl.float32), mask=m)
        tl.store(p_ptr + idx, cast(p, P_DTYPE), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# The launcher: tables (cached by the tensors' addresses and shapes), checks, four launches.
# ---------------------------------------------------------------------------------------------------------------


class _Tables:
    """Device tables of one call's tensors, and what the device ops between launches need."""

    def __init__(self, params, lists, device, br, bc):
        tensors, tiles, mats = [], [], []
        tile_first, numels, col = [], [], 0
        for i, p in enumerate(params):
            n = p.numel()
            factored = p.dim() >= 2
            R, C = (p.shape[-2], p.shape[-1]) if factored else (1, bc)
            tensors.append([t.data_ptr() if t is not None else 0 for t in lists[i]] + [n, R, C, int(factored)])
            tile_first.append(len(tiles))
            numels.append(n)
            if n == 0:
                continue
            if factored:
                for b in range(n // (R * C)):
                    k0 = len(tiles)
                    for r in range(0, R, br):
                        tiles.append([i, b * R + r, b * R + min(r + br, R), col, len(mats)])
                        col += C
                    mats.append([i, b, k0, len(tiles)])
            else:
                rows = (n + bc - 1) // bc
                for r in range(0, rows, br):
                    tiles.append([i, r, min(r + br, rows), 0, -1])
        tile_first.append(len(tiles))
        self.n_tiles, self.n_mats, self.n_cols = len(tiles), len(mats), col

        def dev(rows, width):
            host = torch.tensor(rows or [[0] * width], dtype=torch.int64)
            return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)

        self.tensors, self.tiles, self.mats = dev(tensors, _T_COLS), dev(tiles, _TILE_COLS), dev(mats, _MAT_COLS)
        self.bounds = torch.tensor(tile_first, dtype=torch.int64).to(device)
        self.numel = torch.tensor(numels, dtype=torch.float64).to(device)


def _tables(params, grads, masters, masks, row_vars, col_vars, device):
    lists = [(p, g, masters[i] if masters else None, masks[i] if masks else None, row_vars[i],
              col_vars[i] if params[i].dim() >= 2 else None) for i, (p, g) in enumerate(zip(params, grads))]
    key = (device, BLOCK_R, BLOCK_C, tuple((tuple(p.shape),) + tuple(t.data_ptr() if t is not None else 0 for t in ts)
                                         for p, ts in zip(params, lists)))
    hit = _cache.get(key)
    if hit is None:
        if len(_cache) >= 16:
            _cache.pop(next(iter(_cache)))
        hit = _cache[key] = _Tables(params, lists, device, BLOCK_R, BLOCK_C)
    return hit


def _segment(partial, bounds):
    """Per-tensor sums of per-tile partials (tiles of a tensor are consecutive; a tensor without tiles sums to 0)."""
    cs = torch.cat([partial.new_zeros(1), partial.cumsum(0)])
    return cs.index_select(0, bounds[1:]) - cs.index_select(0, bounds[:-1])


def _check(params, grads, row_vars, col_vars, masters, masks, lr_tensor, grad_scale, found_inf, step):
    op = "adafactor_step"
    n = len(params)
    for name, lst, required in (("grads", grads, True), ("row_vars", row_vars, True), ("col_vars", col_vars, True),
                                ("masters", masters, False), ("masks", masks, False)):
        if len(lst) != n and (required or len(lst) != 0):
            raise ValueError(f"{op}: {name} must have one tensor per param ({n}), got {len(lst)}")
    p_dtype, device = params[0].dtype, params[0].device
    if p_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: params must be float32, float64, bfloat16 or float16, got {p_dtype}")
    if masters and p_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: masters are float32 copies of bfloat16/float16 params, but params are {p_dtype}")
    s_dtype = torch.float32 if masters else p_dtype
    for i, p in enumerate(params):
        n_el = p.numel()
        R, C = (p.shape[-2], p.shape[-1]) if p.dim() >= 2 else (1, 1)
        want = {"grads": (grads[i], p_dtype, n_el),
                "row_vars": (row_vars[i], s_dtype, n_el // C if p.dim() >= 2 and C else n_el),
                "col_vars": (col_vars[i], s_dtype, (n_el // R if R else 0) if p.dim() >= 2 else 0)}
        if masters:
            want["masters"] = (masters[i], torch.float32, n_el)
        if masks:
            want["masks"] = (masks[i], torch.bool, n_el)
        for name, (t, dtype, numel) in [("params", (p, p_dtype, n_el))] + list(want.items()):
            if t.dtype != dtype:
                raise TypeError(f"{op}: {name}[{i}] must be {dtype}, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device}, params[0] on {device}")
            if t.numel() != numel:
                raise ValueError(f"{op}: {name}[{i}] has {t.numel()} elements, expected {numel}")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] must be contiguous")
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf), ("step", step)):
        if t is not None and (t.numel() != 1 or t.device != device):
            raise ValueError(f"{op}: {name} must be one element on {device}")
    return s_dtype


def adafactor_step(params, grads, row_vars, col_vars, masters, masks, *, lr, beta2_decay, eps1, eps2, d,
                   weight_decay, maximize, l1, step_count, lr_tensor=None, grad_scale=None, found_inf=None,
                   step=None):
    """Adafactor on every tensor of `params` in place (conventions of csrc/ops.cpp's adafactor_step_)."""
    if not params:
        return
    s_dtype = _check(params, grads, row_vars, col_vars, masters, masks, lr_tensor, grad_scale, found_inf, step)
    device = params[0].device
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"adafactor_step: params must be CUDA tensors (CPU tensors need TRITON_INTERPRET=1), "
                         f"got {device}")
    tb = _tables(params, grads, masters, masks, row_vars, col_vars, device)
    if tb.n_tiles == 0:
        return
    cd = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    f64 = dict(dtype=torch.float64, device=device)
    s = step.reshape(()).to(torch.float64) if step is not None else torch.tensor(float(step_count), **f64)
    lr_v = lr_tensor.reshape(()).to(torch.float64) if lr_tensor is not None else torch.tensor(float(lr), **f64)
    rho = torch.minimum(lr_v, 1 / s**0.5)
    # [w, 1 - lr*wd, lr*l1 (0 without l1), eps1, eps1²] in float64, rounded to the compute dtype in the kernels
    sc = torch.stack([s**beta2_decay, 1 - lr_v * weight_decay, lr_v * l1 if l1 > 0 else lr_v * 0,
                      torch.tensor(float(eps1), **f64), torch.tensor(float(eps1) * float(eps1), **f64)])
    flags = dict(P_DTYPE=tl_dtype(params[0].dtype), S_DTYPE=tl_dtype(s_dtype), CD=compute_dtype(params[0].dtype),
                 HAS_MASTER=bool(masters), HAS_MASK=bool(masks), HAS_SCALE=grad_scale is not None,
                 HAS_INF=found_inf is not None, MAXIMIZE=bool(maximize), BR=BLOCK_R, BC=BLOCK_C)
    table = tb.tensors
    scale = grad_scale if grad_scale is not None else table
    inf = found_inf if found_inf is not None else table
    colpart = torch.empty(max(tb.n_cols, 1), dtype=cd, device=device)
    ppart = torch.empty(tb.n_tiles, **f64)
    grid = (tb.n_tiles,)
    _stats_kernel[grid](tb.tiles, table, sc, scale, inf, colpart, ppart, **flags)
    rmean = torch.ones(max(tb.n_mats, 1), **f64)
    if tb.n_mats:
        _columns_kernel[(tb.n_mats,)](tb.mats, tb.tiles, table, sc, inf, colpart, rmean, S_DTYPE=flags["S_DTYPE"],
                                      CD=flags["CD"], HAS_INF=flags["HAS_INF"], BC=BLOCK_C)
    p_norm = _segment(ppart, tb.bounds).sqrt().to(cd).to(torch.float64)
    alpha = torch.clamp_min(p_norm / tb.numel.sqrt(), float(eps2)) * rho
    upart = torch.empty(tb.n_tiles, **f64)
    _norms_kernel[grid](tb.tiles, table, sc, scale, inf, rmean, upart, **flags)
    u_norm = _segment(upart, tb.bounds).sqrt().to(cd).to(torch.float64)
    coef = -alpha / torch.clamp_min(u_norm / (tb.numel.sqrt() * float(d)), 1.0)
    _apply_kernel[grid](tb.tiles, table, sc, scale, inf, rmean, coef, **flags)
