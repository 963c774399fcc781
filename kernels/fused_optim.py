"""Fused optimizer steps in Triton: SGD, Adam/AdamW, Adagrad, RMSprop, NAdam, RAdam, Adamax and Lion, one launch
per call for all parameters.

Each function updates its lists in place, with the names, signatures and math of `nnopt.reference.fused_optim`
(torch.optim's single-tensor path, op for op). Per element, with g the gradient (divided by grad_scale; negated
when maximize; 0 where masked), p the parameter (its fp32 master copy when masters are given) and lr the learning
rate (lr_tensor's value when given):

SGD      g += wd*p; if momentum: buf = g (first step) or momentum*buf + (1-dampening)*g;
         g = g + momentum*buf (nesterov) or buf;  p += -lr*g
Adam     if wd: p *= 1 - lr*wd (decoupled, AdamW) or g += wd*p;  m = lerp(m, g, 1-beta1);
         v = v*beta2 + (1-beta2)*g*g;  vmax = max(vmax, v) (amsgrad);
         p += -(lr/bc1) * m / (sqrt(v or vmax)/bc2_sqrt + eps)
Adagrad  g += wd*p;  s += g*g;  p += -(lr/lr_decay_denom) * g / (sqrt(s) + eps)
RMSprop  g += wd*p;  v = v*alpha + (1-alpha)*g*g;  ga = lerp(ga, g, 1-alpha) (centered);
         avg = sqrt(v - ga*ga (centered) or v) + eps;
         buf = buf*momentum + g/avg; p += -lr*buf (momentum > 0)  or  p += -lr * g/avg
then     p = sign(p) * max(|p| - lr*l1, 0) (l1 > 0); masked entries of p, master and states = 0.
When found_inf is given and nonzero, nothing changes.

Shapes: any (tensor i of every list has params[i]'s numel); every tensor contiguous, all on one CUDA device (CPU
with TRITON_INTERPRET=1). Dtypes: params/grads one of float32, float64, bfloat16, float16 (one dtype for the whole
call); states float32 when masters (float32 copies of bfloat16/float16 params) are given, else the params' dtype;
masks bool; lr_tensor and grad_scale one floating element; found_inf one element.

Numerics: math runs in float32 (float64 for float64 params). The hyperparameters reach the kernel as float64 and
the derived scalars (1-beta1, lr/bc1, 1-lr*wd, lr*l1, ...) are formed in float64 and rounded once to the compute
dtype, as torch rounds a Python scalar; division and sqrt are IEEE (`div_rn`, `sqrt_rn`); `a + alpha*b`, addcmul
and lerp use the fma ATen's vectorised CPU kernels use. Stores round to nearest even (`_utils.cast`). Against the
reference on CPU the only per-step difference left is torch's CPU sqrt, which is not correctly rounded (1 ulp).
lr_tensor, grad_scale and found_inf are read inside the kernel, never on the host.
"""

import itertools
import os

import torch
import triton
import triton.language as tl

from . import _multi_tensor
from ._multi_tensor import chunk_bounds, slot_ptr
from ._utils import cast, compute_dtype, div_rn, f64, lerp, sqrt_rn, tl_dtype

# ---------------------------------------------------------------------------------------------------------------
# Shared jit pieces. Slot order in the table: param, grad, [master], [mask], states...
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _setup(table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
           HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
           N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Everything loop-invariant, read once per program: the chunk bounds (an empty chunk when found_inf is
    nonzero), lr and grad_scale as float64, and the pointers of param, grad, master and mask (an absent master or
    mask gets the param's pointer, never dereferenced)."""
    row, start, lim, end = chunk_bounds(table, N_SLOTS, CHUNK, BLOCK)
    if HAS_INF:
        skip = tl.load(inf_ptr) != 0
        lim = tl.where(skip, start, lim)
        end = tl.where(skip, start, end)
    if HAS_LR_T:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = f64(lr)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float64)
    else:
        scale = f64(1.0)
    p_ptr = slot_ptr(row, 0, P_DTYPE, ALIGNED)
    g_ptr = slot_ptr(row, 1, P_DTYPE, ALIGNED)
    w_ptr = p_ptr
    if HAS_MASTER:
        w_ptr = slot_ptr(row, 2, tl.float32, ALIGNED)
    k_ptr = p_ptr
    if HAS_MASK:
        k_ptr = slot_ptr(row, 2 + HAS_MASTER, tl.int8, ALIGNED)
    return row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr


@triton.jit
def _prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, CD: tl.constexpr, HAS_MASTER: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """Loads (p, g, keep) in the compute dtype: p from the master when there is one, g unscaled, negated when
    maximizing and 0 where masked; keep is the mask (the bounds mask without masks)."""
    if HAS_MASTER:
        p = tl.load(w_ptr + offs, mask=m, other=0.0).to(CD)
    else:
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(CD)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(CD)
    if HAS_SCALE:
        g = div_rn(g, scale.to(CD), CD)
    if MAXIMIZE:
        g = -g
    keep = m
    if HAS_MASK:
        keep = tl.load(k_ptr + offs, mask=m, other=0) != 0
        g = tl.where(keep, g, 0.0)
    return p, g, keep


@triton.jit
def _load_state(ptr, offs, m, CD: tl.constexpr):
    return tl.load(ptr + offs, mask=m, other=0.0).to(CD)


@triton.jit
def _store_state(ptr, offs, m, x, keep, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        x = tl.where(keep, x, 0.0)
    tl.store(ptr + offs, cast(x, ptr.dtype.element_ty), mask=m)


@triton.jit
def _epilogue(p_ptr, w_ptr, offs, m, p, keep, l1_thr, do_l1, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr):
    """L1 proximal step (when do_l1), mask, then stores p into the master and the param."""
    shrunk = tl.maximum(tl.abs(p) - l1_thr, 0.0)
    p = tl.where(do_l1, tl.where(p > 0, shrunk, tl.where(p < 0, -shrunk, p)), p)
    if HAS_MASK:
        p = tl.where(keep, p, 0.0)
    if HAS_MASTER:
        tl.store(w_ptr + offs, p.to(tl.float32), mask=m)
    tl.store(p_ptr + offs, cast(p, p_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: each walks its chunk's full blocks (vectorised), then the partial block. A state slot the step does not
# use gets the first state's pointer, never dereferenced.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sgd_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, buf_ptr, scale, lr, momentum, one_m_damp, wd, l1,
               CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               FIRST_STEP: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE)
    g = tl.where(wd != 0, tl.fma(p, wd.to(CD), g), g)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = g
        else:
            buf = tl.fma(g, one_m_damp.to(CD), _load_state(buf_ptr, offs, m, CD) * momentum.to(CD))
        _store_state(buf_ptr, offs, m, buf, keep, HAS_MASK)
        if NESTEROV:
            g = tl.fma(buf, momentum.to(CD), g)
        else:
            g = buf
    p = tl.fma(g, (-lr).to(CD), p)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _sgd_kernel(table, lr_ptr, scale_ptr, inf_ptr, lr: tl.float64, momentum: tl.float64, dampening: tl.float64,
                weight_decay: tl.float64, l1: tl.float64, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    buf_ptr = p_ptr
    if HAS_MOMENTUM:
        buf_ptr = slot_ptr(row, 2 + HAS_MASTER + HAS_MASK, S_DTYPE, ALIGNED)
    momentum = f64(momentum)
    one_m_damp = 1.0 - f64(dampening)
    wd = f64(weight_decay)
    l1 = f64(l1)
    for i in range((lim - start) // BLOCK):
        _sgd_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, buf_ptr, scale, lr, momentum, one_m_damp, wd,
                   l1, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, HAS_MOMENTUM, NESTEROV, FIRST_STEP, BLOCK)
    for off in range(lim, end, BLOCK):
        _sgd_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, buf_ptr, scale, lr, momentum, one_m_damp, wd, l1, CD,
                   HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, HAS_MOMENTUM, NESTEROV, FIRST_STEP, BLOCK)


@triton.jit
def _adam_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, vmax_ptr, scale, lr, beta1, beta2, eps, wd,
                l1, bc1, bc2_sqrt, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE)
    if DECOUPLED:
        p = tl.where(wd != 0, p * (1.0 - lr * wd).to(CD), p)
    else:
        g = tl.where(wd != 0, tl.fma(p, wd.to(CD), g), g)
    exp_avg = lerp(_load_state(m_ptr, offs, m, CD), g, (1.0 - beta1).to(CD))
    exp_avg_sq = tl.fma((1.0 - beta2).to(CD) * g, g, _load_state(v_ptr, offs, m, CD) * beta2.to(CD))
    _store_state(m_ptr, offs, m, exp_avg, keep, HAS_MASK)
    _store_state(v_ptr, offs, m, exp_avg_sq, keep, HAS_MASK)
    if AMSGRAD:
        v = tl.maximum(_load_state(vmax_ptr, offs, m, CD), exp_avg_sq)
        _store_state(vmax_ptr, offs, m, v, keep, HAS_MASK)
    else:
        v = exp_avg_sq
    denom = div_rn(sqrt_rn(v, CD), bc2_sqrt.to(CD), CD) + eps.to(CD)
    p = p + div_rn((-(lr / bc1)).to(CD) * exp_avg, denom, CD)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _adam_kernel(table, lr_ptr, scale_ptr, inf_ptr, step_ptr, lr: tl.float64, beta1: tl.float64, beta2: tl.float64,
                 eps: tl.float64, weight_decay: tl.float64, l1: tl.float64, bias_correction1: tl.float64,
                 bias_correction2_sqrt: tl.float64, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, CD: tl.constexpr,
                 HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_INF: tl.constexpr, HAS_STEP: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                 AMSGRAD: tl.constexpr, N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    S0: tl.constexpr = 2 + HAS_MASTER + HAS_MASK
    m_ptr = slot_ptr(row, S0, S_DTYPE, ALIGNED)
    v_ptr = slot_ptr(row, S0 + 1, S_DTYPE, ALIGNED)
    vmax_ptr = m_ptr
    if AMSGRAD:
        vmax_ptr = slot_ptr(row, S0 + 2, S_DTYPE, ALIGNED)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    eps = f64(eps)
    wd = f64(weight_decay)
    l1 = f64(l1)
    bc1 = f64(bias_correction1)
    bc2_sqrt = f64(bias_correction2_sqrt)
    if HAS_STEP:  # device-resident step count: torch.optim's bias corrections, in float64, from it
        step = tl.load(step_ptr).to(tl.float64)
        # beta**step as exp(step*log(beta)) in float64 (libdevice.pow has no interpreter twin): off from
        # torch's pow by ~1e-16 relative, far below the float32 update's rounding; beta = 0 gives exp(-inf) = 0.
        bc1 = 1 - tl.exp(step * tl.log(beta1))
        bc2_sqrt = tl.sqrt(1 - tl.exp(step * tl.log(beta2)))  # float64 sqrt: exact
    for i in range((lim - start) // BLOCK):
        _adam_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, vmax_ptr, scale, lr, beta1,
                    beta2, eps, wd, l1, bc1, bc2_sqrt, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, DECOUPLED,
                    AMSGRAD, BLOCK)
    for off in range(lim, end, BLOCK):
        _adam_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, vmax_ptr, scale, lr, beta1, beta2, eps, wd,
                    l1, bc1, bc2_sqrt, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, DECOUPLED, AMSGRAD, BLOCK)


@triton.jit
def _adagrad_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, sum_ptr, scale, lr, wd, eps, l1, lr_decay_denom,
                   CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
                   MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE)
    g = tl.where(wd != 0, tl.fma(p, wd.to(CD), g), g)
    s = tl.fma(g, g, _load_state(sum_ptr, offs, m, CD))
    _store_state(sum_ptr, offs, m, s, keep, HAS_MASK)
    std = sqrt_rn(s, CD) + eps.to(CD)
    p = p + div_rn((-(lr / lr_decay_denom)).to(CD) * g, std, CD)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _adagrad_kernel(table, lr_ptr, scale_ptr, inf_ptr, step_ptr, lr: tl.float64, weight_decay: tl.float64,
                    eps: tl.float64, l1: tl.float64, lr_decay_denom: tl.float64, lr_decay: tl.float64,
                    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr,
                    HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
                    N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    sum_ptr = slot_ptr(row, 2 + HAS_MASTER + HAS_MASK, S_DTYPE, ALIGNED)
    wd = f64(weight_decay)
    eps = f64(eps)
    l1 = f64(l1)
    lr_decay_denom = f64(lr_decay_denom)
    if HAS_STEP:  # device-resident step count
        lr_decay_denom = 1 + (tl.load(step_ptr).to(tl.float64) - 1) * f64(lr_decay)
    for i in range((lim - start) // BLOCK):
        _adagrad_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, sum_ptr, scale, lr, wd, eps, l1,
                       lr_decay_denom, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, BLOCK)
    for off in range(lim, end, BLOCK):
        _adagrad_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, sum_ptr, scale, lr, wd, eps, l1, lr_decay_denom, CD,
                       HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, BLOCK)


@triton.jit
def _rmsprop_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, sq_ptr, buf_ptr, ga_ptr, scale, lr, alpha, eps, wd,
                   momentum, l1, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                   CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE)
    g = tl.where(wd != 0, tl.fma(p, wd.to(CD), g), g)
    v = tl.fma((1.0 - alpha).to(CD) * g, g, _load_state(sq_ptr, offs, m, CD) * alpha.to(CD))
    _store_state(sq_ptr, offs, m, v, keep, HAS_MASK)
    if CENTERED:
        ga = lerp(_load_state(ga_ptr, offs, m, CD), g, (1.0 - alpha).to(CD))
        _store_state(ga_ptr, offs, m, ga, keep, HAS_MASK)
        avg = sqrt_rn(tl.fma(-ga, ga, v), CD)
    else:
        avg = sqrt_rn(v, CD)
    avg = avg + eps.to(CD)
    if HAS_MOMENTUM:
        buf = _load_state(buf_ptr, offs, m, CD) * momentum.to(CD) + div_rn(g, avg, CD)
        _store_state(buf_ptr, offs, m, buf, keep, HAS_MASK)
        p = tl.fma(buf, (-lr).to(CD), p)
    else:
        p = p + div_rn((-lr).to(CD) * g, avg, CD)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _rmsprop_kernel(table, lr_ptr, scale_ptr, inf_ptr, lr: tl.float64, alpha: tl.float64, eps: tl.float64,
                    weight_decay: tl.float64, momentum: tl.float64, l1: tl.float64, P_DTYPE: tl.constexpr,
                    S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                    HAS_MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, N_SLOTS: tl.constexpr,
                    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    # states: square_avgs, [momentum_buffers], [grad_avgs]
    S0: tl.constexpr = 2 + HAS_MASTER + HAS_MASK
    sq_ptr = slot_ptr(row, S0, S_DTYPE, ALIGNED)
    buf_ptr = sq_ptr
    if HAS_MOMENTUM:
        buf_ptr = slot_ptr(row, S0 + 1, S_DTYPE, ALIGNED)
    ga_ptr = sq_ptr
    if CENTERED:
        ga_ptr = slot_ptr(row, S0 + 1 + HAS_MOMENTUM, S_DTYPE, ALIGNED)
    alpha = f64(alpha)
    eps = f64(eps)
    wd = f64(weight_decay)
    momentum = f64(momentum)
    l1 = f64(l1)
    for i in range((lim - start) // BLOCK):
        _rmsprop_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, sq_ptr, buf_ptr, ga_ptr, scale, lr, alpha,
                       eps, wd, momentum, l1, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, HAS_MOMENTUM, CENTERED,
                       BLOCK)
    for off in range(lim, end, BLOCK):
        _rmsprop_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, sq_ptr, buf_ptr, ga_ptr, scale, lr, alpha, eps, wd,
                       momentum, l1, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, HAS_MOMENTUM, CENTERED, BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------

_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _interpreting():
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; before it, the environment variable itself
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check(op, params, grads, masters, masks, states, lr_tensor, grad_scale, found_inf, step=None):
    """Validates what is per call (list lengths, the params' dtype and device, the one-element tensors) and returns
    the table's lists in slot order (params, grads, [masters], [masks], states...) with the `launch` keywords that
    check them per tensor (op, list names, expected dtypes: `_multi_tensor._table` checks dtypes, devices, numels and
    contiguity on a table-cache miss, addresses, numels and dtypes on a hit), and the constexprs they imply.
    `states` maps a name to a list the step uses."""
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"{op}: grads has {len(grads)} tensors, params has {n}")
    for name, lst in (("masters", masters), ("masks", masks)):
        if len(lst) not in (0, n):
            raise ValueError(f"{op}: {name} must be empty or have one tensor per param ({n}), got {len(lst)}")
    for name, lst in states.items():
        if len(lst) != n:
            raise ValueError(f"{op}: {name} must have one tensor per param ({n}), got {len(lst)}")

    p_dtype = params[0].dtype
    if p_dtype not in _PARAM_DTYPES:
        raise TypeError(f"{op}: params must be float32, float64, bfloat16 or float16, got {p_dtype}")
    if masters and p_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: masters are float32 copies of bfloat16/float16 params, but params are {p_dtype}")
    s_dtype = torch.float32 if masters else p_dtype
    device = params[0].device
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"{op}: params must be CUDA tensors (CPU tensors need TRITON_INTERPRET=1), got {device}")
    lists, names, dtypes = [params, grads], ["params", "grads"], [p_dtype, p_dtype]
    if masters:
        lists.append(masters), names.append("masters"), dtypes.append(torch.float32)
    if masks:
        lists.append(masks), names.append("masks"), dtypes.append(torch.bool)
    for name, lst in states.items():
        lists.append(lst), names.append(name), dtypes.append(s_dtype)
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf), ("step", step)):
        if t is None:
            continue
        if t.numel() != 1:
            raise ValueError(f"{op}: {name} must have one element, got {t.numel()}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, params[0] on {device}")
        if name != "found_inf" and not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
        if t.dtype.is_complex:
            raise TypeError(f"{op}: {name} must be a real tensor, got {t.dtype}")
    flags = {"P_DTYPE": tl_dtype(p_dtype), "S_DTYPE": tl_dtype(s_dtype), "CD": compute_dtype(p_dtype),
             "HAS_MASTER": bool(masters), "HAS_MASK": bool(masks), "HAS_LR_T": lr_tensor is not None,
             "HAS_SCALE": grad_scale is not None, "HAS_INF": found_inf is not None}
    return lists, {"op": op, "names": names, "dtypes": dtypes}, flags


def sgd_step(params, grads, momentum_buffers, masters, masks, *, lr, momentum, dampening, nesterov,
             weight_decay, maximize, l1, first_step, lr_tensor=None, grad_scale=None, found_inf=None):
    """SGD (momentum, dampening, nesterov, weight decay) on every tensor of `params`, in place; see the module
    docstring. momentum_buffers must be full when momentum != 0 (ignored otherwise)."""
    if not params:
        return
    has_momentum = momentum != 0
    states = {"momentum_buffers": momentum_buffers} if has_momentum else {}
    lists, check, flags = _check("sgd_step", params, grads, masters, masks, states, lr_tensor, grad_scale, found_inf)
    _multi_tensor.launch(
        _sgd_kernel, lists,
        [lr_tensor, grad_scale, found_inf,
         float(lr), float(momentum), float(dampening), float(weight_decay), float(l1)],
        MAXIMIZE=bool(maximize), HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov) and has_momentum,
        FIRST_STEP=bool(first_step) and has_momentum, **check, **flags)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps,
              weight_decay, decoupled, amsgrad, maximize, l1, bias_correction1, bias_correction2_sqrt,
              lr_tensor=None, grad_scale=None, found_inf=None, step=None):
    """Adam / AdamW (decoupled) / AMSGrad on every tensor of `params`, in place; see the module docstring.
    max_exp_avg_sqs must be full when amsgrad (ignored otherwise). A `step` tensor replaces the bias corrections."""
    if not params:
        return
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    lists, check, flags = _check("adam_step", params, grads, masters, masks, states, lr_tensor, grad_scale, found_inf,
                                 step)
    _multi_tensor.launch(
        _adam_kernel, lists,
        [lr_tensor, grad_scale, found_inf, step, float(lr), float(beta1), float(beta2), float(eps),
         float(weight_decay), float(l1), float(bias_correction1), float(bias_correction2_sqrt)],
        MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad), HAS_STEP=step is not None,
        **check, **flags)


def adagrad_step(params, grads, state_sums, masters, masks, *, lr, weight_decay, eps, maximize, l1, lr_decay_denom,
                 lr_tensor=None, grad_scale=None, found_inf=None, lr_decay=0.0, step=None):
    """Adagrad on every tensor of `params`, in place; see the module docstring. lr_decay_denom is
    1 + (step - 1) * lr_decay, computed in the kernel from `step` and `lr_decay` when a `step` tensor is given."""
    if not params:
        return
    states = {"state_sums": state_sums}
    lists, check, flags = _check("adagrad_step", params, grads, masters, masks, states, lr_tensor, grad_scale,
                                 found_inf, step)
    _multi_tensor.launch(
        _adagrad_kernel, lists,
        [lr_tensor, grad_scale, found_inf, step, float(lr), float(weight_decay), float(eps), float(l1),
         float(lr_decay_denom), float(lr_decay)],
        MAXIMIZE=bool(maximize), HAS_STEP=step is not None, **check, **flags)


def rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, masters, masks, *, lr, alpha, eps,
                 weight_decay, momentum, centered, maximize, l1, lr_tensor=None, grad_scale=None, found_inf=None):
    """RMSprop (momentum, centered) on every tensor of `params`, in place; see the module docstring.
    momentum_buffers must be full when momentum > 0, grad_avgs when centered (each ignored otherwise)."""
    if not params:
        return
    has_momentum = momentum > 0
    states = {"square_avgs": square_avgs}
    if has_momentum:
        states["momentum_buffers"] = momentum_buffers
    if centered:
        states["grad_avgs"] = grad_avgs
    lists, check, flags = _check("rmsprop_step", params, grads, masters, masks, states, lr_tensor, grad_scale,
                          found_inf)
    _multi_tensor.launch(
        _rmsprop_kernel, lists,
        [lr_tensor, grad_scale, found_inf, float(lr), float(alpha), float(eps),
         float(weight_decay), float(momentum), float(l1)],
        MAXIMIZE=bool(maximize), HAS_MOMENTUM=has_momentum, CENTERED=bool(centered), **check, **flags)


# ---------------------------------------------------------------------------------------------------------------
# NAdam, RAdam, Adamax, Lion (math in nnopt.reference.fused_optim). States: m, v (Adamax: m, exp_inf; Lion: m).
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _pow(base, step):
    """base**step in float64 as exp(step*log(base)) (see _adam_kernel); base = 0 gives 0."""
    return tl.exp(step * tl.log(base))


@triton.jit
def _adam_like_prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, lr, wd, CD: tl.constexpr,
                        HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
                        MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr):
    p, g, keep = _prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE)
    if DECOUPLED:
        p = tl.where(wd != 0, p * (1.0 - lr * wd).to(CD), p)
    else:
        g = tl.where(wd != 0, tl.fma(p, wd.to(CD), g), g)
    return p, g, keep


@triton.jit
def _moments(m_ptr, v_ptr, offs, m, g, keep, beta1, beta2, CD: tl.constexpr, HAS_MASK: tl.constexpr):
    exp_avg = lerp(_load_state(m_ptr, offs, m, CD), g, (1.0 - beta1).to(CD))
    exp_avg_sq = tl.fma((1.0 - beta2).to(CD) * g, g, _load_state(v_ptr, offs, m, CD) * beta2.to(CD))
    _store_state(m_ptr, offs, m, exp_avg, keep, HAS_MASK)
    _store_state(v_ptr, offs, m, exp_avg_sq, keep, HAS_MASK)
    return exp_avg, exp_avg_sq


@triton.jit
def _nadam_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, scale, lr, beta1, beta2, eps, wd, l1, bc2,
                 c_grad, c_avg, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _adam_like_prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, lr, wd, CD, HAS_MASTER, HAS_MASK,
                                     HAS_SCALE, MAXIMIZE, DECOUPLED)
    exp_avg, exp_avg_sq = _moments(m_ptr, v_ptr, offs, m, g, keep, beta1, beta2, CD, HAS_MASK)
    denom = sqrt_rn(div_rn(exp_avg_sq, bc2.to(CD), CD), CD) + eps.to(CD)
    p = p + div_rn(c_grad.to(CD) * g, denom, CD)
    p = p + div_rn(c_avg.to(CD) * exp_avg, denom, CD)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _nadam_kernel(table, lr_ptr, scale_ptr, inf_ptr, step_ptr, mup_ptr, lr: tl.float64, beta1: tl.float64,
                  beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64, l1: tl.float64,
                  momentum_decay: tl.float64, bias_correction2: tl.float64, mu: tl.float64, mu_next: tl.float64,
                  mu_product: tl.float64, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, CD: tl.constexpr,
                  HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_INF: tl.constexpr, HAS_STEP: tl.constexpr, HAS_MUP: tl.constexpr, MAXIMIZE: tl.constexpr,
                  DECOUPLED: tl.constexpr, N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    S0: tl.constexpr = 2 + HAS_MASTER + HAS_MASK
    m_ptr = slot_ptr(row, S0, S_DTYPE, ALIGNED)
    v_ptr = slot_ptr(row, S0 + 1, S_DTYPE, ALIGNED)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    eps = f64(eps)
    wd = f64(weight_decay)
    l1 = f64(l1)
    bc2 = f64(bias_correction2)
    mu = f64(mu)
    mu_next = f64(mu_next)
    mu_product = f64(mu_product)
    if HAS_STEP:
        step = tl.load(step_ptr).to(tl.float64)
        md = f64(momentum_decay)
        bc2 = 1 - _pow(beta2, step)
        mu = beta1 * (1.0 - 0.5 * _pow(f64(0.96), step * md))
        mu_next = beta1 * (1.0 - 0.5 * _pow(f64(0.96), (step + 1) * md))
    if HAS_MUP:
        mu_product = tl.load(mup_ptr).to(tl.float64)
    c_grad = (-lr * (1.0 - mu)) / (1.0 - mu_product)
    c_avg = (-lr * mu_next) / (1.0 - mu_product * mu_next)
    for i in range((lim - start) // BLOCK):
        _nadam_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, scale, lr, beta1, beta2, eps,
                     wd, l1, bc2, c_grad, c_avg, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, DECOUPLED, BLOCK)
    for off in range(lim, end, BLOCK):
        _nadam_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, scale, lr, beta1, beta2, eps, wd, l1, bc2,
                     c_grad, c_avg, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, DECOUPLED, BLOCK)


@triton.jit
def _radam_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, scale, lr, beta1, beta2, eps, wd, l1, bc1,
                 bc2_sqrt, rect, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _adam_like_prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, lr, wd, CD, HAS_MASTER, HAS_MASK,
                                     HAS_SCALE, MAXIMIZE, DECOUPLED)
    exp_avg, exp_avg_sq = _moments(m_ptr, v_ptr, offs, m, g, keep, beta1, beta2, CD, HAS_MASK)
    x = div_rn(exp_avg, bc1.to(CD), CD) * lr.to(CD)
    adaptive = div_rn(tl.full(exp_avg.shape, 1.0, CD), sqrt_rn(exp_avg_sq, CD) + eps.to(CD), CD) * bc2_sqrt.to(CD)
    rectified = (x * adaptive) * rect.to(CD)
    p = p - tl.where(rect > 0, rectified, x)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _radam_kernel(table, lr_ptr, scale_ptr, inf_ptr, step_ptr, lr: tl.float64, beta1: tl.float64,
                  beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64, l1: tl.float64,
                  bias_correction1: tl.float64, bias_correction2_sqrt: tl.float64, rect: tl.float64,
                  P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr,
                  HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                  HAS_STEP: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, N_SLOTS: tl.constexpr,
                  ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    S0: tl.constexpr = 2 + HAS_MASTER + HAS_MASK
    m_ptr = slot_ptr(row, S0, S_DTYPE, ALIGNED)
    v_ptr = slot_ptr(row, S0 + 1, S_DTYPE, ALIGNED)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    eps = f64(eps)
    wd = f64(weight_decay)
    l1 = f64(l1)
    bc1 = f64(bias_correction1)
    bc2_sqrt = f64(bias_correction2_sqrt)
    rect = f64(rect)
    if HAS_STEP:  # torch.optim.RAdam's count-derived scalars, in float64, from the device count
        step = tl.load(step_ptr).to(tl.float64)
        bc1 = 1 - _pow(beta1, step)
        bc2 = 1 - _pow(beta2, step)
        bc2_sqrt = tl.sqrt(bc2)
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * _pow(beta2, step) / bc2
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = tl.where(rho_t > 5.0, tl.sqrt(tl.maximum(ratio, 0.0)), 0.0)
    for i in range((lim - start) // BLOCK):
        _radam_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, scale, lr, beta1, beta2, eps,
                     wd, l1, bc1, bc2_sqrt, rect, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, DECOUPLED, BLOCK)
    for off in range(lim, end, BLOCK):
        _radam_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, v_ptr, scale, lr, beta1, beta2, eps, wd, l1, bc1,
                     bc2_sqrt, rect, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, DECOUPLED, BLOCK)


@triton.jit
def _adamax_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, u_ptr, scale, lr, beta1, beta2, eps, wd, l1, bc1,
                  CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
                  MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _adam_like_prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, lr, wd, CD, HAS_MASTER, HAS_MASK,
                                     HAS_SCALE, MAXIMIZE, False)
    exp_avg = lerp(_load_state(m_ptr, offs, m, CD), g, (1.0 - beta1).to(CD))
    a = _load_state(u_ptr, offs, m, CD) * beta2.to(CD)
    b = tl.abs(g) + eps.to(CD)
    u = tl.where((a > b) | (a != a), a, b)  # torch.maximum: NaN propagates
    _store_state(m_ptr, offs, m, exp_avg, keep, HAS_MASK)
    _store_state(u_ptr, offs, m, u, keep, HAS_MASK)
    p = p + div_rn((-(lr / bc1)).to(CD) * exp_avg, u, CD)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _adamax_kernel(table, lr_ptr, scale_ptr, inf_ptr, step_ptr, lr: tl.float64, beta1: tl.float64,
                   beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64, l1: tl.float64,
                   bias_correction1: tl.float64, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, CD: tl.constexpr,
                   HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
                   N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    S0: tl.constexpr = 2 + HAS_MASTER + HAS_MASK
    m_ptr = slot_ptr(row, S0, S_DTYPE, ALIGNED)
    u_ptr = slot_ptr(row, S0 + 1, S_DTYPE, ALIGNED)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    eps = f64(eps)
    wd = f64(weight_decay)
    l1 = f64(l1)
    bc1 = f64(bias_correction1)
    if HAS_STEP:
        bc1 = 1 - _pow(beta1, tl.load(step_ptr).to(tl.float64))
    for i in range((lim - start) // BLOCK):
        _adamax_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, u_ptr, scale, lr, beta1, beta2, eps,
                      wd, l1, bc1, CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, BLOCK)
    for off in range(lim, end, BLOCK):
        _adamax_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, u_ptr, scale, lr, beta1, beta2, eps, wd, l1, bc1,
                      CD, HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, BLOCK)


@triton.jit
def _lion_block(off, bound, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, scale, lr, beta1, beta2, wd, l1, CD: tl.constexpr,
                HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    m = offs < bound
    p, g, keep = _adam_like_prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, lr, wd, CD, HAS_MASTER, HAS_MASK,
                                     HAS_SCALE, MAXIMIZE, True)
    exp_avg = _load_state(m_ptr, offs, m, CD)
    c = tl.fma(g, (1.0 - beta1).to(CD), exp_avg * beta1.to(CD))
    sgn = (c > 0).to(CD) - (c < 0).to(CD)
    p = tl.fma(sgn, (-lr).to(CD), p)
    exp_avg = tl.fma(g, (1.0 - beta2).to(CD), exp_avg * beta2.to(CD))
    _store_state(m_ptr, offs, m, exp_avg, keep, HAS_MASK)
    _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _lion_kernel(table, lr_ptr, scale_ptr, inf_ptr, lr: tl.float64, beta1: tl.float64, beta2: tl.float64,
                 weight_decay: tl.float64, l1: tl.float64, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                 CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, N_SLOTS: tl.constexpr,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    m_ptr = slot_ptr(row, 2 + HAS_MASTER + HAS_MASK, S_DTYPE, ALIGNED)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    wd = f64(weight_decay)
    l1 = f64(l1)
    for i in range((lim - start) // BLOCK):
        _lion_block(start + i * BLOCK, lim, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, scale, lr, beta1, beta2, wd, l1, CD,
                    HAS_MASTER, HAS_MASK, HAS_SCALE, MAXIMIZE, BLOCK)
    for off in range(lim, end, BLOCK):
        _lion_block(off, end, p_ptr, g_ptr, w_ptr, k_ptr, m_ptr, scale, lr, beta1, beta2, wd, l1, CD, HAS_MASTER,
                    HAS_MASK, HAS_SCALE, MAXIMIZE, BLOCK)


def nadam_step(params, grads, exp_avgs, exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps, weight_decay,
               decoupled, maximize, l1, momentum_decay, bias_correction2, mu, mu_next, mu_product, lr_tensor=None,
               grad_scale=None, found_inf=None, step=None, mu_product_tensor=None):
    """NAdam / NAdamW on every tensor of `params`, in place; see nnopt.reference.fused_optim. A `step` tensor
    replaces bias_correction2, mu and mu_next; `mu_product_tensor` replaces mu_product."""
    if not params:
        return
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    lists, check, flags = _check("nadam_step", params, grads, masters, masks, states, lr_tensor, grad_scale,
                                 found_inf, step)
    if mu_product_tensor is not None:
        _check("nadam_step", params, grads, masters, masks, states, mu_product_tensor, None, None)
    _multi_tensor.launch(
        _nadam_kernel, lists,
        [lr_tensor, grad_scale, found_inf, step, mu_product_tensor, float(lr), float(beta1), float(beta2),
         float(eps), float(weight_decay), float(l1), float(momentum_decay), float(bias_correction2), float(mu),
         float(mu_next), float(mu_product)],
        MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled), HAS_STEP=step is not None,
        HAS_MUP=mu_product_tensor is not None, **check, **flags)


def radam_step(params, grads, exp_avgs, exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps, weight_decay,
               decoupled, maximize, l1, bias_correction1, bias_correction2_sqrt, rect, lr_tensor=None,
               grad_scale=None, found_inf=None, step=None):
    """RAdam / RAdamW on every tensor of `params`, in place; a `step` tensor replaces the count-derived scalars."""
    if not params:
        return
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    lists, check, flags = _check("radam_step", params, grads, masters, masks, states, lr_tensor, grad_scale,
                                 found_inf, step)
    _multi_tensor.launch(
        _radam_kernel, lists,
        [lr_tensor, grad_scale, found_inf, step, float(lr), float(beta1), float(beta2), float(eps),
         float(weight_decay), float(l1), float(bias_correction1), float(bias_correction2_sqrt), float(rect)],
        MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled), HAS_STEP=step is not None, **check, **flags)


def adamax_step(params, grads, exp_avgs, exp_infs, masters, masks, *, lr, beta1, beta2, eps, weight_decay, maximize,
                l1, bias_correction1, lr_tensor=None, grad_scale=None, found_inf=None, step=None):
    """Adamax on every tensor of `params`, in place; a `step` tensor replaces bias_correction1."""
    if not params:
        return
    states = {"exp_avgs": exp_avgs, "exp_infs": exp_infs}
    lists, check, flags = _check("adamax_step", params, grads, masters, masks, states, lr_tensor, grad_scale,
                                 found_inf, step)
    _multi_tensor.launch(
        _adamax_kernel, lists,
        [lr_tensor, grad_scale, found_inf, step, float(lr), float(beta1), float(beta2), float(eps),
         float(weight_decay), float(l1), float(bias_correction1)],
        MAXIMIZE=bool(maximize), HAS_STEP=step is not None, **check, **flags)


def lion_step(params, grads, exp_avgs, masters, masks, *, lr, beta1, beta2, weight_decay, maximize, l1,
              lr_tensor=None, grad_scale=None, found_inf=None):
    """Lion on every tensor of `params`, in place."""
    if not params:
        return
    lists, check, flags = _check("lion_step", params, grads, masters, masks, {"exp_avgs": exp_avgs}, lr_tensor,
                                 grad_scale, found_inf)
    _multi_tensor.launch(
        _lion_kernel, lists,
        [lr_tensor, grad_scale, found_inf, float(lr), float(beta1), float(beta2), float(weight_decay), float(l1)],
        MAXIMIZE=bool(maximize), **check, **flags)


# ---------------------------------------------------------------------------------------------------------------
# LAMB (apex FusedLAMB; math in nnopt.reference.fused_optim) and per-tensor L2 norms. Reductions are two-stage and
# deterministic: each program writes its chunk's partial sums, then a float64 cumulative sum over the chunks (a
# tensor's chunks are consecutive) gives each tensor's total as a difference of two entries.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _lamb_direction(p, m, v, keep, bc1, bc2, eps, wd, CD: tl.constexpr, ADAM_W: tl.constexpr):
    u = div_rn(div_rn(m, bc1.to(CD), CD), sqrt_rn(div_rn(v, bc2.to(CD), CD), CD) + eps.to(CD), CD)
    if ADAM_W:
        u = tl.fma(p, wd.to(CD), u)
    return tl.where(keep, u, 0.0)


@triton.jit
def _lamb_scalars(step_ptr, beta1, beta2, bias_correction1, bias_correction2, HAS_STEP: tl.constexpr,
                  BIAS_CORRECTION: tl.constexpr):
    bc1 = f64(bias_correction1)
    bc2 = f64(bias_correction2)
    if HAS_STEP:
        if BIAS_CORRECTION:
            step = tl.load(step_ptr).to(tl.float64)
            bc1 = 1 - _pow(beta1, step)
            bc2 = 1 - _pow(beta2, step)
        else:
            bc1 = f64(1.0)
            bc2 = f64(1.0)
    return bc1, bc2


@triton.jit
def _lamb_pass1_kernel(table, lr_ptr, scale_ptr, inf_ptr, step_ptr, gnorm_ptr, partial_ptr, lr: tl.float64,
                       beta1: tl.float64, beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
                       max_grad_norm: tl.float64, bias_correction1: tl.float64, bias_correction2: tl.float64,
                       P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr,
                       HAS_INF: tl.constexpr, HAS_STEP: tl.constexpr, HAS_GNORM: tl.constexpr,
                       MAXIMIZE: tl.constexpr, ADAM_W: tl.constexpr, GRAD_AVERAGING: tl.constexpr,
                       BIAS_CORRECTION: tl.constexpr, N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    S0: tl.constexpr = 2 + HAS_MASTER + HAS_MASK
    m_ptr = slot_ptr(row, S0, S_DTYPE, ALIGNED)
    v_ptr = slot_ptr(row, S0 + 1, S_DTYPE, ALIGNED)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    eps = f64(eps)
    wd = f64(weight_decay)
    bc1, bc2 = _lamb_scalars(step_ptr, beta1, beta2, bias_correction1, bias_correction2, HAS_STEP, BIAS_CORRECTION)
    clip = f64(1.0)
    if HAS_GNORM:
        norm = tl.load(gnorm_ptr).to(tl.float64) / scale
        max_norm = f64(max_grad_norm)
        clip = tl.where((max_norm > 0) & (norm > max_norm), norm / tl.where(max_norm > 0, max_norm, 1.0), 1.0)
    beta3 = 1.0 - beta1
    if not GRAD_AVERAGING:
        beta3 = f64(1.0)
    pn = tl.zeros((BLOCK,), tl.float32).to(CD)
    un = tl.zeros((BLOCK,), tl.float32).to(CD)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        m = offs < end
        p, g, keep = _prologue(p_ptr, g_ptr, w_ptr, k_ptr, offs, m, scale, CD, HAS_MASTER, HAS_MASK, HAS_SCALE,
                               MAXIMIZE)
        g = div_rn(g, clip.to(CD), CD)
        if not ADAM_W:
            g = tl.fma(p, wd.to(CD), g)
        exp_avg = tl.fma(g, beta3.to(CD), _load_state(m_ptr, offs, m, CD) * beta1.to(CD))
        exp_avg_sq = tl.fma((1.0 - beta2).to(CD) * g, g, _load_state(v_ptr, offs, m, CD) * beta2.to(CD))
        exp_avg = tl.where(keep, exp_avg, 0.0)
        exp_avg_sq = tl.where(keep, exp_avg_sq, 0.0)
        _store_state(m_ptr, offs, m, exp_avg, keep, HAS_MASK)
        _store_state(v_ptr, offs, m, exp_avg_sq, keep, HAS_MASK)
        u = _lamb_direction(p, exp_avg, exp_avg_sq, keep, bc1, bc2, eps, wd, CD, ADAM_W)
        pk = tl.where(keep, p, 0.0)
        pn += pk * pk
        un += u * u
    pid = tl.program_id(0).to(tl.int64)
    tl.store(partial_ptr + 2 * pid, tl.sum(pn, 0).to(tl.float64))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(un, 0).to(tl.float64))


@triton.jit
def _lamb_pass2_kernel(table, lr_ptr, scale_ptr, inf_ptr, step_ptr, ratio_ptr, lr: tl.float64, beta1: tl.float64,
                       beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64, l1: tl.float64,
                       bias_correction1: tl.float64, bias_correction2: tl.float64, P_DTYPE: tl.constexpr,
                       S_DTYPE: tl.constexpr, CD: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MASK: tl.constexpr,
                       HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                       HAS_STEP: tl.constexpr, ADAM_W: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                       N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end, lr, scale, p_ptr, g_ptr, w_ptr, k_ptr = _setup(
        table, lr, lr_ptr, scale_ptr, inf_ptr, P_DTYPE, HAS_MASTER, HAS_MASK, HAS_LR_T, HAS_SCALE, HAS_INF, N_SLOTS,
        ALIGNED, CHUNK, BLOCK)
    S0: tl.constexpr = 2 + HAS_MASTER + HAS_MASK
    m_ptr = slot_ptr(row, S0, S_DTYPE, ALIGNED)
    v_ptr = slot_ptr(row, S0 + 1, S_DTYPE, ALIGNED)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    eps = f64(eps)
    wd = f64(weight_decay)
    l1 = f64(l1)
    bc1, bc2 = _lamb_scalars(step_ptr, beta1, beta2, bias_correction1, bias_correction2, HAS_STEP, BIAS_CORRECTION)
    t = tl.load(table + 2 * tl.program_id(0).to(tl.int64))
    neg_ratio = (-tl.load(ratio_ptr + t)).to(CD)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        m = offs < end
        if HAS_MASTER:
            p = tl.load(w_ptr + offs, mask=m, other=0.0).to(CD)
        else:
            p = tl.load(p_ptr + offs, mask=m, other=0.0).to(CD)
        keep = m
        if HAS_MASK:
            keep = tl.load(k_ptr + offs, mask=m, other=0) != 0
        u = _lamb_direction(p, _load_state(m_ptr, offs, m, CD), _load_state(v_ptr, offs, m, CD), keep, bc1, bc2, eps,
                            wd, CD, ADAM_W)
        p = tl.fma(u, neg_ratio, p)
        _epilogue(p_ptr, w_ptr, offs, m, p, keep, (lr * l1).to(CD), l1 > 0, HAS_MASTER, HAS_MASK)


@triton.jit
def _sum_squares_kernel(table, partial_ptr, DTYPE: tl.constexpr, N_SLOTS: tl.constexpr, ALIGNED: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, lim, end = chunk_bounds(table, N_SLOTS, CHUNK, BLOCK)
    x_ptr = slot_ptr(row, 0, DTYPE, ALIGNED)
    acc = tl.zeros((BLOCK,), tl.float32)
    if DTYPE == tl.float64:
        acc = acc.to(tl.float64)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(acc.dtype)
        acc += x * x
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64), tl.sum(acc, 0).to(tl.float64))


def _segment_sums(partial, numels, chunk):
    """Per-tensor sums of per-chunk partials [C, K] (float64): the chunks of the non-empty tensors, in order."""
    counts = [(n + chunk - 1) // chunk for n in numels if n > 0]
    ends = torch.tensor(list(itertools.accumulate(counts)), device=partial.device) - 1
    cs = partial.cumsum(0)
    totals = cs.index_select(0, ends)
    return torch.cat([totals[:1], totals[1:] - totals[:-1]])


def l2_norms(tensors):
    """Per-tensor L2 norms of contiguous floating tensors on one device: float32 [len(tensors)] (one launch per
    dtype present; chunk partials in float32, float64 for float64 tensors, summed in float64)."""
    device = tensors[0].device
    out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    by_dtype = {}
    for i, t in enumerate(tensors):
        if t.dtype not in _PARAM_DTYPES:
            raise TypeError(f"l2_norms: tensors[{i}] has dtype {t.dtype}, expected a floating dtype")
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        lst = [tensors[i] for i in idx]
        nonempty = [i for i, t in zip(idx, lst) if t.numel() > 0]
        if not nonempty:
            continue
        n_chunks = sum((t.numel() + _multi_tensor.CHUNK - 1) // _multi_tensor.CHUNK for t in lst)
        partial = torch.empty(n_chunks, dtype=torch.float64, device=device)
        _multi_tensor.launch(_sum_squares_kernel, [lst], [partial], op="l2_norms", names=["tensors"],
                             dtypes=[dtype], DTYPE=tl_dtype(dtype))
        sums = _segment_sums(partial[:, None], [t.numel() for t in lst], _multi_tensor.CHUNK)[:, 0]
        out[torch.tensor(nonempty, device=device)] = sums
    return out.sqrt().to(torch.float32)


def lamb_step(params, grads, exp_avgs, exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps, weight_decay,
              adam_w_mode, grad_averaging, use_nvlamb, bias_correction, max_grad_norm, maximize, l1, bias_correction1,
              bias_correction2, lr_tensor=None, grad_scale=None, found_inf=None, step=None, grad_norm=None):
    """LAMB (apex FusedLAMB) on every tensor of `params`, in place: a moments-and-norms launch, the per-tensor
    trust ratios from the chunk partials (device ops, no host read), then an update launch."""
    if not params:
        return
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    lists, check, flags = _check("lamb_step", params, grads, masters, masks, states, lr_tensor, grad_scale,
                                 found_inf, step)
    if grad_norm is not None:
        _check("lamb_step", params, grads, masters, masks, states, grad_norm, None, None)
    device = params[0].device
    n_chunks = sum((p.numel() + _multi_tensor.CHUNK - 1) // _multi_tensor.CHUNK for p in params)
    if n_chunks == 0:
        return
    partial = torch.zeros((n_chunks, 2), dtype=torch.float64, device=device)
    common = dict(HAS_STEP=step is not None, ADAM_W=bool(adam_w_mode), BIAS_CORRECTION=bool(bias_correction))
    _multi_tensor.launch(
        _lamb_pass1_kernel, lists,
        [lr_tensor, grad_scale, found_inf, step, grad_norm, partial, float(lr), float(beta1), float(beta2),
         float(eps), float(weight_decay), float(max_grad_norm), float(bias_correction1), float(bias_correction2)],
        HAS_GNORM=grad_norm is not None, MAXIMIZE=bool(maximize), GRAD_AVERAGING=bool(grad_averaging), **common,
        **check, **flags)
    norms = _segment_sums(partial, [p.numel() for p in params], _multi_tensor.CHUNK).sqrt()
    lr_value = lr_tensor.reshape(()).to(torch.float64) if lr_tensor is not None else float(lr)
    trust = (norms[:, 0] != 0) & (norms[:, 1] != 0) & bool(use_nvlamb or weight_decay != 0)
    ratio = torch.where(trust, lr_value * (norms[:, 0] / norms[:, 1]), lr_value)
    _multi_tensor.launch(
        _lamb_pass2_kernel, lists,
        [lr_tensor, grad_scale, found_inf, step, ratio, float(lr), float(beta1), float(beta2), float(eps),
         float(weight_decay), float(l1), float(bias_correction1), float(bias_correction2)],
        **common, **check, **flags)


from .fused_adafactor import adafactor_step  # noqa: E402,F401  (its own file: tiles, not chunks)
from .fused_muon import muon_momentum, muon_update  # noqa: E402,F401
