"""Muon's element-wise steps (torch.optim.Muon; reference: `nnopt.reference.fused_optim.muon_momentum` and
`muon_update`) in Triton, one launch of the multi-tensor launcher each for every tensor of a call:

    muon_momentum  g /= grad_scale (0 where masked);  buf = lerp(buf, g, 1 - momentum) (0 where masked);
                   update = lerp(g, buf, momentum) (nesterov) or buf, stored in the updates' dtype (bf16 for
                   the Newton–Schulz chain, which stays batched torch matmuls);
    muon_update    p = p * (1 - lr*wd) + (-(lr * lr_ratios[i])) * update;  L1;  0 where masked.

Dtypes: grads/params float32, float64, bfloat16 or float16 (one per call), buffers and updates any of those (one
each), masters float32, masks bool. Math in float32 (float64 for float64). lr_tensor, grad_scale and found_inf
are read on the device.
"""

import torch
import triton
import triton.language as tl

from . import _multi_tensor
from ._multi_tensor import chunk_bounds, slot_ptr
from ._utils import cast, compute_dtype, div_rn, f64, lerp, tl_dtype
from .fused_optim import _interpreting

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@triton.jit
def _bounds(table, inf_ptr, HAS_INF: tl.constexpr, N_SLOTS: tl.constexpr, CHUNK: tl.constexpr,
            BLOCK: tl.constexpr):
    row, start, lim, end = chunk_bounds(table, N_SLOTS, CHUNK, BLOCK)
    if HAS_INF:  # a skipped step: an empty chunk
        end = tl.where(tl.load(inf_ptr) != 0, start, end)
    return row, start, end


@triton.jit
def _momentum_kernel(table, scale_ptr, inf_ptr, momentum: tl.float64, G_DTYPE: tl.constexpr,
                     B_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, NESTEROV: tl.constexpr, N_SLOTS: tl.constexpr,
                     ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, end = _bounds(table, inf_ptr, HAS_INF, N_SLOTS, CHUNK, BLOCK)
    g_ptr = slot_ptr(row, 0, G_DTYPE, ALIGNED)
    b_ptr = slot_ptr(row, 1, B_DTYPE, ALIGNED)
    u_ptr = slot_ptr(row, 2, U_DTYPE, ALIGNED)
    k_ptr = g_ptr
    if HAS_MASK:
        k_ptr = slot_ptr(row, 3, tl.int8, ALIGNED)
    mom = f64(momentum)
    w = (1.0 - mom).to(CD)
    mom = mom.to(CD)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        m = offs < end
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(CD)
        if HAS_SCALE:
            g = div_rn(g, tl.load(scale_ptr).to(CD), CD)
        keep = m
        if HAS_MASK:
            keep = tl.load(k_ptr + offs, mask=m, other=0) != 0
            g = tl.where(keep, g, 0.0)
        buf = lerp(tl.load(b_ptr + offs, mask=m, other=0.0).to(CD), g, w)
        if HAS_MASK:
            buf = tl.where(keep, buf, 0.0)
        tl.store(b_ptr + offs, cast(buf, B_DTYPE), mask=m)
        if NESTEROV:
            u = lerp(g, buf, mom)
        else:
            u = buf
        tl.store(u_ptr + offs, cast(u, U_DTYPE), mask=m)


@triton.jit
def _update_kernel(table, lr_ptr, inf_ptr, ratio_ptr, lr: tl.float64, weight_decay: tl.float64, l1: tl.float64,
                   P_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr, HAS_INF: tl.constexpr, N_SLOTS: tl.constexpr,
                   ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, end = _bounds(table, inf_ptr, HAS_INF, N_SLOTS, CHUNK, BLOCK)
    p_ptr = slot_ptr(row, 0, P_DTYPE, ALIGNED)
    u_ptr = slot_ptr(row, 1, U_DTYPE, ALIGNED)
    w_ptr = p_ptr
    if HAS_MASTER:
        w_ptr = slot_ptr(row, 2, tl.float32, ALIGNED)
    k_ptr = p_ptr
    if HAS_MASK:
        k_ptr = slot_ptr(row, 2 + HAS_MASTER, tl.int8, ALIGNED)
    if HAS_LR_T:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = f64(lr)
    t = tl.load(table + 2 * tl.program_id(0).to(tl.int64))
    alpha = (-(lr * tl.load(ratio_ptr + t))).to(CD)
    decay = (1.0 - lr * f64(weight_decay)).to(CD)
    l1 = f64(l1)
    thr = tl.where(l1 > 0, lr * l1, 0.0).to(CD)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        m = offs < end
        if HAS_MASTER:
            p = tl.load(w_ptr + offs, mask=m, other=0.0).to(CD)
        else:
            p = tl.load(p_ptr + offs, mask=m, other=0.0).to(CD)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(CD)
        p = tl.fma(alpha, u, p * decay)
        shrunk = tl.maximum(tl.abs(p) - thr, 0.0)
        p = tl.where(p > 0, shrunk, tl.where(p < 0, -shrunk, p))
        if HAS_MASK:
            p = tl.where(tl.load(k_ptr + offs, mask=m, other=0) != 0, p, 0.0)
        if HAS_MASTER:
            tl.store(w_ptr + offs, p.to(tl.float32), mask=m)
        tl.store(p_ptr + offs, cast(p, P_DTYPE), mask=m)


def _device(op, first, scalars):
    device = first.device
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"{op}: tensors must be CUDA tensors (CPU tensors need TRITON_INTERPRET=1), got {device}")
    for name, t in scalars.items():
        if t is not None and (t.numel() != 1 or t.device != device):
            raise ValueError(f"{op}: {name} must be one element on {device}")
    return device


def _dtype(op, name, lst):
    dtype = lst[0].dtype
    if dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got {dtype}")
    return dtype


def muon_momentum(grads, momentum_buffers, updates, masks, *, momentum, nesterov, grad_scale=None, found_inf=None):
    """Muon's momentum step on every tensor, in place (buffers and updates)."""
    if not grads:
        return
    op = "muon_momentum"
    _device(op, grads[0], {"grad_scale": grad_scale, "found_inf": found_inf})
    for name, lst in (("momentum_buffers", momentum_buffers), ("updates", updates)):
        if len(lst) != len(grads):
            raise ValueError(f"{op}: {name} must have one tensor per grad ({len(grads)}), got {len(lst)}")
    dts = [_dtype(op, n, lst) for n, lst in (("grads", grads), ("momentum_buffers", momentum_buffers),
                                            ("updates", updates))]
    lists, names = [grads, momentum_buffers, updates], ["grads", "momentum_buffers", "updates"]
    if masks:
        lists.append(masks), names.append("masks"), dts.append(torch.bool)
    _multi_tensor.launch(
        _momentum_kernel, lists, [grad_scale, found_inf, float(momentum)], op=op, names=names, dtypes=dts,
        G_DTYPE=tl_dtype(dts[0]), B_DTYPE=tl_dtype(dts[1]), U_DTYPE=tl_dtype(dts[2]), CD=compute_dtype(dts[0]),
        HAS_MASK=bool(masks), HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        NESTEROV=bool(nesterov))


def muon_update(params, updates, masters, masks, *, lr, weight_decay, lr_ratios, l1, lr_tensor=None,
                found_inf=None):
    """Muon's parameter step on every tensor, in place (params and masters)."""
    if not params:
        return
    op = "muon_update"
    device = _device(op, params[0], {"lr_tensor": lr_tensor, "found_inf": found_inf})
    if len(lr_ratios) != len(params):
        raise ValueError(f"{op}: lr_ratios must hold one value per param ({len(params)}), got {len(lr_ratios)}")
    p_dtype, u_dtype = _dtype(op, "params", params), _dtype(op, "updates", updates)
    if masters and p_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: masters are float32 copies of bfloat16/float16 params, but params are {p_dtype}")
    lists, names, dts = [params, updates], ["params", "updates"], [p_dtype, u_dtype]
    if masters:
        lists.append(masters), names.append("masters"), dts.append(torch.float32)
    if masks:
        lists.append(masks), names.append("masks"), dts.append(torch.bool)
    # the kernel indexes the ratios by non-empty tensor (the launcher's tensor rows)
    ratios = torch.tensor([r for r, p in zip(lr_ratios, params) if p.numel() > 0] or [0.0], dtype=torch.float64)
    ratios = ratios.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ratios
    _multi_tensor.launch(
        _update_kernel, lists, [lr_tensor, found_inf, ratios, float(lr), float(weight_decay), float(l1)], op=op,
        names=names, dtypes=dts, P_DTYPE=tl_dtype(p_dtype), U_DTYPE=tl_dtype(u_dtype), CD=compute_dtype(p_dtype),
        HAS_MASTER=bool(masters), HAS_MASK=bool(masks), HAS_LR_T=lr_tensor is not None, HAS_INF=found_inf is not None)
