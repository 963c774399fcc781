"""Optimizer steps with 32/16/8/4-bit states in Triton (family: quant_optim), one launch per call for all tensors.

Same function, signature and results as `nnopt.reference.quant_optim.quant_step` (formats, quantizer and stochastic
rounding are defined there): one program per quantization block of one tensor dequantizes the block's states (map
lookups times the block's absmax), runs the fused step's element update (`op`: sgd_step, adam_step, adagrad_step,
rmsprop_step; the math of kernels/fused_optim.py and csrc/include/nnopt/optim_math.h, op for op), reduces the new
absmax on the bit patterns (NaN wins, as on the CPU) and requantizes with a branch-free binary search over the
midpoints: code = #{mids < x}, the reference's searchsorted, so codes are identical.

Launch table (int64), as kernels/_multi_tensor.py but with a row per block and per-slot sizes of their own:
    rows 0 .. B-1   block b:  [tensor index, first element]
    rows B ..       tensor t: [param, grad, master, mask, s0, s1, s2, scale0, scale1, scale2 addresses, numel]
The table depends only on addresses and sizes: it is cached by them, built with tensor ops (no per-block Python)
and copied to the device from pinned memory without blocking; the stochastic-rounding key of tensor t,
(seed * 0x9E3779B1 + t * 0x85EBCA77) mod 2^32, is formed in the kernel from the per-step `seed` argument.
Shapes: any (flat, contiguous); params/grads float32, bfloat16 or float16; masters float32; masks bool; states and
scales as the reference's formats. CUDA tensors (CPU with TRITON_INTERPRET=1).
"""

import torch
import triton
import triton.language as tl

from . import _qmaps
from ._utils import cast, div_rn, f64, lerp, sqrt_rn, tl_dtype

_ROW = 11  # entries per tensor row
_CACHE_SIZE = 64
_cache = {}
_SIGNED = {"sgd_step": (1, 0, 0), "adam_step": (1, 0, 0), "adagrad_step": (0, 0, 0), "rmsprop_step": (0, 1, 1)}
_OP_ID = {"sgd_step": 0, "adam_step": 1, "adagrad_step": 2, "rmsprop_step": 3}


@triton.jit
def _ptr(row, k: tl.constexpr, DTYPE: tl.constexpr):
    return tl.load(row + k).to(tl.pointer_type(DTYPE))


@triton.jit
def _load_state(s_ptr, sc_ptr, q_ptr, offs, m, blk, BITS: tl.constexpr):
    """float32 values of one state slot over the block (0 outside it)."""
    if BITS == 32:
        return tl.load(s_ptr + offs, mask=m, other=0.0)
    elif BITS == 16:
        return tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
    elif BITS == 8:
        code = tl.load(s_ptr + offs, mask=m, other=0).to(tl.int32)
        a = tl.load(sc_ptr + blk)
        return tl.where(m, tl.load(q_ptr + code) * a, 0.0)
    else:
        byte = tl.load(s_ptr + offs // 2, mask=m, other=0).to(tl.int32)
        code = (byte >> ((offs & 1) * 4).to(tl.int32)) & 15
        a = tl.load(sc_ptr + blk).to(tl.float32)
        return tl.where(m, tl.load(q_ptr + code) * a, 0.0)


@triton.jit
def _store_state(s_ptr, sc_ptr, mid_ptr, x, offs, m, blk, start, numel, SIGNED: tl.constexpr, BITS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Stores the block's float32 values into one state slot, requantizing with the block's new absmax."""
    if BITS == 32:
        tl.store(s_ptr + offs, x, mask=m)
    elif BITS == 16:
        tl.store(s_ptr + offs, cast(x, tl.bfloat16), mask=m)
    else:
        x = tl.where(m, x, 0.0)
        amax = tl.max(x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, axis=0)
        if BITS == 4:
            amax = (amax + 0xFFFF) & 0xFFFF0000
        a = amax.to(tl.float32, bitcast=True)
        r = div_rn(tl.full((), 1.0, tl.float32), tl.where(a > 0, a, 1.0), tl.float32)
        xn = x * r
        NQ: tl.constexpr = 1 << BITS
        pos = tl.zeros([BLOCK], tl.int32)
        for lvl in tl.static_range(BITS):
            step: tl.constexpr = NQ >> (lvl + 1)
            v = tl.load(mid_ptr + pos + (step - 1))
            pos = tl.where(v < xn, pos + step, pos)
        pos = tl.where(xn != xn, NQ - 1, pos)
        if not SIGNED:
            pos = tl.where((xn > 0) & (pos == 0), 1, pos)
        code = tl.where(m, pos, 0)
        if BITS == 8:
            tl.store(s_ptr + offs, code.to(tl.uint8), mask=m)
            tl.store(sc_ptr + blk, a)
        else:
            lo, hi = tl.split(tl.reshape(code, (BLOCK // 2, 2)))
            j = start // 2 + tl.arange(0, BLOCK // 2)
            tl.store(s_ptr + j, (lo | (hi << 4)).to(tl.uint8), mask=j < (numel + 1) // 2)
            tl.store(sc_ptr + blk, (amax >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True))


@triton.jit
def _hash(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _kernel(table, qmap_ptr, mids_ptr, lr_ptr, scale_ptr, inf_ptr, step_ptr, seed, lr, h1, h2, h3, h4, h5, h6, h7,
            P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, SC_DTYPE: tl.constexpr, OP: tl.constexpr,
            BITS: tl.constexpr, U0: tl.constexpr, U1: tl.constexpr, U2: tl.constexpr, SG0: tl.constexpr,
            SG1: tl.constexpr, SG2: tl.constexpr, FA: tl.constexpr, FB: tl.constexpr, FC: tl.constexpr,
            HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr,
            HAS_INF: tl.constexpr, HAS_STEP: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_INF:
        if tl.load(inf_ptr) != 0:
            return
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.num_programs(0).to(tl.int64)
    t = tl.load(table + 2 * pid)
    start = tl.load(table + 2 * pid + 1)
    row = table + 2 * n_blocks + t * 11
    numel = tl.load(row + 10)
    offs = start + tl.arange(0, BLOCK)
    m = offs < numel
    blk = start // BLOCK
    lr = f64(lr)
    if HAS_LR_T:
        lr = tl.load(lr_ptr).to(tl.float64)
    p_ptr = _ptr(row, 0, P_DTYPE)
    if HAS_MASTER:
        p = tl.load(_ptr(row, 2, tl.float32) + offs, mask=m, other=0.0)
    else:
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(_ptr(row, 1, P_DTYPE) + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = div_rn(g, tl.load(scale_ptr).to(tl.float32), tl.float32)
    keep = m
    if HAS_MASK:
        keep = tl.load(_ptr(row, 3, tl.int8) + offs, mask=m, other=0) != 0
    s0 = tl.zeros([BLOCK], tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    if U0:
        s0 = _load_state(_ptr(row, 4, S_DTYPE), _ptr(row, 7, SC_DTYPE), qmap_ptr + (1 - SG0) * (1 << BITS), offs,
                         m, blk, BITS)
    if U1:
        s1 = _load_state(_ptr(row, 5, S_DTYPE), _ptr(row, 8, SC_DTYPE), qmap_ptr + (1 - SG1) * (1 << BITS), offs,
                         m, blk, BITS)
    if U2:
        s2 = _load_state(_ptr(row, 6, S_DTYPE), _ptr(row, 9, SC_DTYPE), qmap_ptr + (1 - SG2) * (1 << BITS), offs,
                         m, blk, BITS)
    h1, h2, h3, h4, h5, h6, h7 = f64(h1), f64(h2), f64(h3), f64(h4), f64(h5), f64(h6), f64(h7)
    # hyper (float64) and flags per OP, as nnopt._ext orders them: see the launcher.
    if OP == 0:  # SGD: h1 momentum, h2 dampening, h3 wd, h4 l1; FA nesterov, FB maximize, FC first_step
        if FB:
            g = -g
        if HAS_MASK:
            g = tl.where(keep, g, 0.0)
        wd = h3
        g = tl.where(wd != 0, tl.fma(wd.to(tl.float32), p, g), g)
        if U0:
            if FC:
                s0 = g
            else:
                s0 = tl.fma((1.0 - h2).to(tl.float32), g, s0 * h1.to(tl.float32))
            if FA:
                g = tl.fma(h1.to(tl.float32), s0, g)
            else:
                g = s0
        p = tl.fma((-lr).to(tl.float32), g, p)
        l1 = h4
    elif OP == 1:  # Adam: h1 beta1, h2 beta2, h3 eps, h4 wd, h5 l1, h6 bc1, h7 bc2_sqrt; FA decoupled, FB amsgrad,
        # FC maximize
        if FC:
            g = -g
        if HAS_MASK:
            g = tl.where(keep, g, 0.0)
        bc1 = h6
        bc2 = h7
        if HAS_STEP:
            stp = tl.load(step_ptr).to(tl.float64)
            bc1 = 1 - tl.exp(stp * tl.log(h1))
            bc2 = tl.sqrt(1 - tl.exp(stp * tl.log(h2)))
        wd = h4
        if FA:
            p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
        else:
            g = tl.where(wd != 0, tl.fma(wd.to(tl.float32), p, g), g)
        s0 = lerp(s0, g, (1.0 - h1).to(tl.float32))
        s1 = tl.fma((1.0 - h2).to(tl.float32) * g, g, s1 * h2.to(tl.float32))
        vd = s1
        if FB:
            s2 = tl.where((s2 > s1) | (s2 != s2), s2, s1)
            vd = s2
        denom = div_rn(sqrt_rn(vd, tl.float32), bc2.to(tl.float32), tl.float32) + h3.to(tl.float32)
        p = p + div_rn((-(lr / bc1)).to(tl.float32) * s0, denom, tl.float32)
        l1 = h5
    elif OP == 2:  # Adagrad: h1 wd, h2 eps, h3 l1, h4 lr_decay_denom, h5 lr_decay; FA maximize
        if FA:
            g = -g
        if HAS_MASK:
            g = tl.where(keep, g, 0.0)
        denom_lr = h4
        if HAS_STEP:
            denom_lr = 1 + (tl.load(step_ptr).to(tl.float64) - 1) * h5
        g = tl.where(h1 != 0, tl.fma(h1.to(tl.float32), p, g), g)
        s0 = tl.fma(g, g, s0)
        std = sqrt_rn(s0, tl.float32) + h2.to(tl.float32)
        p = p + div_rn((-(lr / denom_lr)).to(tl.float32) * g, std, tl.float32)
        l1 = h3
    else:  # RMSprop: h1 alpha, h2 eps, h3 wd, h4 momentum, h5 l1; FA centered, FB maximize
        if FB:
            g = -g
        if HAS_MASK:
            g = tl.where(keep, g, 0.0)
        g = tl.where(h3 != 0, tl.fma(h3.to(tl.float32), p, g), g)
        s0 = tl.fma((1.0 - h1).to(tl.float32) * g, g, s0 * h1.to(tl.float32))
        if FA:
            s2 = lerp(s2, g, (1.0 - h1).to(tl.float32))
            avg = sqrt_rn(tl.fma(-s2, s2, s0), tl.float32)
        else:
            avg = sqrt_rn(s0, tl.float32)
        avg = avg + h2.to(tl.float32)
        if U1:
            s1 = s1 * h4.to(tl.float32) + div_rn(g, avg, tl.float32)
            p = tl.fma((-lr).to(tl.float32), s1, p)
        else:
            p = p + div_rn((-lr).to(tl.float32) * g, avg, tl.float32)
        l1 = h5
    thr = tl.where(l1 > 0, (lr * l1).to(tl.float32), 0.0)
    shrunk = tl.maximum(tl.abs(p) - thr, 0.0)
    p = tl.where(p > 0, shrunk, tl.where(p < 0, -shrunk, p))
    if HAS_MASK:
        p = tl.where(keep, p, 0.0)
        s0 = tl.where(keep, s0, 0.0)
        s1 = tl.where(keep, s1, 0.0)
        s2 = tl.where(keep, s2, 0.0)
    if HAS_MASTER:
        tl.store(_ptr(row, 2, tl.float32) + offs, p, mask=m)
    if SR and not HAS_MASTER:
        key = (seed.to(tl.uint64) * 0x9E3779B1 + t.to(tl.uint64) * 0x85EBCA77).to(tl.uint32)
        r = _hash(offs.to(tl.uint32) ^ key) & 0xFFFF
        bits = p.to(tl.uint32, bitcast=True)
        out = ((bits + r) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(p_ptr + offs, tl.where(p != p, cast(p, tl.bfloat16), out), mask=m)
    else:
        tl.store(p_ptr + offs, cast(p, P_DTYPE), mask=m)
    if U0:
        _store_state(_ptr(row, 4, S_DTYPE), _ptr(row, 7, SC_DTYPE), mids_ptr + (1 - SG0) * (1 << BITS), s0, offs, m,
                     blk, start, numel, SG0, BITS, BLOCK)
    if U1:
        _store_state(_ptr(row, 5, S_DTYPE), _ptr(row, 8, SC_DTYPE), mids_ptr + (1 - SG1) * (1 << BITS), s1, offs, m,
                     blk, start, numel, SG1, BITS, BLOCK)
    if U2:
        _store_state(_ptr(row, 6, S_DTYPE), _ptr(row, 9, SC_DTYPE), mids_ptr + (1 - SG2) * (1 << BITS), s2, offs, m,
                     blk, start, numel, SG2, BITS, BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------

_HYPER = {  # float arguments after lr, and the three flags, per op (nnopt._ext._QUANT_ARGS without lr)
    "sgd_step": (("momentum", "dampening", "weight_decay", "l1"), ("nesterov", "maximize", "first_step")),
    "adam_step": (("beta1", "beta2", "eps", "weight_decay", "l1", "bias_correction1", "bias_correction2_sqrt"),
                  ("decoupled", "amsgrad", "maximize")),
    "adagrad_step": (("weight_decay", "eps", "l1", "lr_decay_denom", "lr_decay"), ("maximize",)),
    "rmsprop_step": (("alpha", "eps", "weight_decay", "momentum", "l1"), ("centered", "maximize")),
}


def _used(op, hyper):
    if op == "sgd_step":
        return (hyper["momentum"] != 0, False, False)
    if op == "adam_step":
        return (True, True, bool(hyper["amsgrad"]))
    if op == "adagrad_step":
        return (True, False, False)
    return (True, hyper["momentum"] > 0, bool(hyper["centered"]))


def quant_step(op, params, grads, states, scales, masters, masks, *, bits, block_size, seed=-1, lr_tensor=None,
               grad_scale=None, found_inf=None, step=None, **hyper):
    """See nnopt.reference.quant_optim.quant_step (same arguments and results)."""
    if op not in _OP_ID:
        raise ValueError(f"quant_step: unknown op {op!r}")
    if bits not in (32, 16, 8, 4):
        raise ValueError(f"quant_step: bits must be 32, 16, 8 or 4, got {bits}")
    if block_size < 32 or block_size & (block_size - 1):
        raise ValueError(f"quant_step: block_size must be a power of two >= 32, got {block_size}")
    if not params:
        return
    n = len(params)
    device = params[0].device
    p_dtype = params[0].dtype
    if p_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quant_step: params must be float32, bfloat16 or float16, got {p_dtype}")
    used = _used(op, hyper)
    slots = [list(states[k]) if k < len(states) else [] for k in range(3)]
    scs = [list(scales[k]) if k < len(scales) else [] for k in range(3)]
    for k in range(3):
        if used[k] and len(slots[k]) != n:
            raise ValueError(f"quant_step: states{k} must hold one tensor per param ({n}), got {len(slots[k])}")
    s_dtype = {32: torch.float32, 16: torch.bfloat16}.get(bits, torch.uint8)
    sc_dtype = torch.float32 if bits == 8 else torch.bfloat16
    block = block_size if bits in (8, 4) else 1024
    _check_lists(params, grads, slots, scs, masters, masks, used, bits, block, p_dtype, s_dtype, sc_dtype, device)
    table, n_blocks = _table(params, grads, slots, scs, masters, masks, used, bits, block, device)
    if n_blocks == 0:
        return
    if bits in (8, 4):
        qmap, mids = (t.to(device) for t in _qmaps.tables(bits))
    else:
        qmap = mids = table
    names, flags = _HYPER[op]
    h = [float(hyper.get(k, 0.0)) for k in names] + [0.0] * (7 - len(names))
    f = [bool(hyper[k]) for k in flags] + [False] * (3 - len(flags))
    signed = _SIGNED[op]
    _kernel[(n_blocks,)](
        table, qmap, mids, lr_tensor if lr_tensor is not None else table,
        grad_scale if grad_scale is not None else table, found_inf if found_inf is not None else table,
        step if step is not None else table, max(int(seed), 0), float(hyper["lr"]), *h,
        P_DTYPE=tl_dtype(p_dtype), S_DTYPE=tl.float32 if bits == 32 else (tl.bfloat16 if bits == 16 else tl.uint8),
        SC_DTYPE=tl.float32 if bits == 8 else tl.bfloat16, OP=_OP_ID[op], BITS=bits, U0=used[0], U1=used[1],
        U2=used[2], SG0=signed[0], SG1=signed[1], SG2=signed[2], FA=f[0], FB=f[1], FC=f[2],
        HAS_MASTER=bool(masters), HAS_MASK=bool(masks), HAS_LR_T=lr_tensor is not None,
        HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        HAS_STEP=step is not None and op in ("adam_step", "adagrad_step"),
        SR=seed >= 0 and p_dtype == torch.bfloat16, BLOCK=block, num_warps=4, enable_fp_fusion=False)


def _table(params, grads, slots, scs, masters, masks, used, bits, block, device):
    """(table, number of blocks): block rows then tensor rows (an absent tensor's address is 0, never read)."""
    n = len(params)
    cols = [params, grads, masters or [None] * n, masks or [None] * n]
    cols += [slots[k] if used[k] else [None] * n for k in range(3)]
    cols += [scs[k] if used[k] and bits in (8, 4) else [None] * n for k in range(3)]
    addr = [[t.data_ptr() if t is not None else 0 for t in col] for col in cols]
    numels = [p.numel() for p in params]
    key = (device, bits, block, tuple(numels), tuple(tuple(a) for a in addr))
    hit = _cache.get(key)
    if hit is not None:
        return hit
    counts = torch.tensor([(x + block - 1) // block for x in numels], dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    starts = (torch.arange(tensor_idx.numel(), dtype=torch.int64) - first) * block
    rows = torch.tensor([[a[i] for a in addr] + [numels[i]] for i in range(n)], dtype=torch.uint64)
    host = torch.cat([torch.stack([tensor_idx, starts], 1).reshape(-1), rows.view(torch.int64).reshape(-1)])
    if device.type == "cuda":
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    if len(_cache) >= _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    _cache[key] = (table, int(tensor_idx.numel()))
    return _cache[key]


def _check_lists(params, grads, slots, scs, masters, masks, used, bits, block, p_dtype, s_dtype, sc_dtype, device):
    n = len(params)
    for name, lst in (("grads", grads), ("masters", masters), ("masks", masks)):
        if name == "grads" and len(lst) != n or len(lst) not in (0, n):
            raise ValueError(f"quant_step: {name} must hold one tensor per param ({n}), got {len(lst)}")
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"quant_step: params must be CUDA tensors (CPU tensors need TRITON_INTERPRET=1), got {device}")

    def check(name, i, t, dtype, numel):
        if t.device != device or t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
            raise ValueError(f"quant_step: {name}[{i}] must be a contiguous {dtype} tensor of {numel} elements on "
                             f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}")

    for i, p in enumerate(params):
        numel = p.numel()
        check("params", i, p, p_dtype, numel)
        check("grads", i, grads[i], p_dtype, numel)
        if masters:
            check("masters", i, masters[i], torch.float32, numel)
        if masks:
            check("masks", i, masks[i], torch.bool, numel)
        for k in range(3):
            if not used[k]:
                continue
            check(f"states{k}", i, slots[k][i], s_dtype, numel if bits != 4 else (numel + 1) // 2)
            if bits in (8, 4):
                check(f"scales{k}", i, scs[k][i], sc_dtype, (numel + block - 1) // block)


def _interpreting():
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
