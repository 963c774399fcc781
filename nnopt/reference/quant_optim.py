"""Optimizer steps with low-precision states (family: quant_optim): the block-wise quantizer and the reference steps.

State formats, by ``bits`` (one format per kernel call):

- 32: float32 states (used here only with stochastic rounding of bf16 parameters).
- 16: bfloat16 states, rounded to nearest even after each update.
- 8:  one uint8 code per element (tensor shaped like the parameter) and one float32 absmax per block of
      ``block_size`` consecutive elements (default 256), as bitsandbytes' block-wise dynamic quantization.
- 4:  two codes per uint8 (element 2j in the low nibble, 2j+1 in the high one; [ceil(n/2)]) and one absmax per
      block (default 128) stored as bfloat16 rounded *up* (so |x| <= 1 still holds): fp32 scales at 128-element
      blocks would cost 0.031 bytes/element, half the whole budget of a 4-bit state's overhead.

Quantization of one block s[0:B] with the map q (sorted ascending, 2^bits values in [-1, 1]):
    a = max|s| (bf16-rounded-up for 4 bits);  x = s * r,  r = 1 / (a if a > 0 else 1)  (float32 division, once
    per block, then one float32 multiply per element: kernels need no per-element division)
    code = #{j : mid[j] < x},  mid[j] = float32((q[j] + q[j+1]) / 2)   -- nearest value, ties to the lower one
    unsigned maps: a positive x never takes the code of 0 (it would turn a second moment into a denominator of
    eps: the "zero-point problem" of 4-bit states), it takes the first nonzero value.
    dequantized value = q[code] * a  (float32).
Zeros quantize to exactly 0 (both maps hold 0), so masked entries of states stay exactly 0.

Maps (state_map): bitsandbytes' dynamic (exponent + linear fraction) map, signed for first moments and momentum
buffers, unsigned for second moments and squared-gradient sums; 8 bits: max_exponent_bits 7; 4 bits: 3, except
4-bit unsigned states, stored with the linear map 0, 1/15, ..., 1 (torchao's AdamW4bit, Li et al. 2023; why:
kernels/_qmaps.py).

A reference step dequantizes every state to float32, runs nnopt.reference.fused_optim's step on those copies (the
oracle may materialise them; the kernels do not) and requantizes. With ``seed`` (>= 0) bf16 parameters without
masters are rounded stochastically: out = bf16 bits of (bits(p) + (hash(key_i, e) & 0xffff)) >> 16 for parameter i
of the call and element e, key_i = (seed * 0x9E3779B1 + i * 0x85EBCA77) mod 2^32, hash = lowbias32(e ^ key_i).

Storage error and the one-step bound of Adam: docs/quantized_states.md (a state is stored within a * G / 2 of its
exact value, G the map's largest gap: 8 bits 0.0141 signed / 0.0070 unsigned).
"""

import torch

from nnopt.reference import fused_optim as _fused

# Which state lists of each fused_optim op hold signed values (momentum-like) or unsigned ones (squares).
SIGNED = {
    "sgd_step": (True,),
    "adam_step": (True, False, False),
    "adagrad_step": (False,),
    "rmsprop_step": (False, True, True),
}
DEFAULT_BLOCK = {8: 256, 4: 128}


def dynamic_map(signed, bits):
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits, total_bits): 2^bits float32 values in [-1, 1]."""
    from nnopt.kernels import _qmaps  # plain torch, shared with the Triton kernels (imported on use: lean import)

    return _qmaps.dynamic_map(signed, bits)


def state_map(signed, bits):
    """The map a state of this signedness is stored with (see the module docstring)."""
    from nnopt.kernels import _qmaps

    return _qmaps.state_map(signed, bits)


def tables(bits, device):
    """The maps and midpoints for ``bits`` (8 or 4) on ``device``: what every kernel reads."""
    from nnopt.kernels import _qmaps

    return tuple(t.to(device) for t in _qmaps.tables(bits))


def _round_up_bf16(a):
    """float32 values rounded up (in magnitude, a >= 0) to the nearest bfloat16, kept as float32."""
    b = a.view(torch.int32)
    return ((b + 0xFFFF) & ~0xFFFF).view(torch.float32)


def num_blocks(numel, block_size):
    return (numel + block_size - 1) // block_size


def codes_numel(numel, bits):
    return numel if bits == 8 else (numel + 1) // 2


def quantize(x, bits, block_size, signed):
    """(codes, absmax) of the float32 values ``x`` (any shape, read in flat order): codes uint8 shaped like x (8
    bits) or [ceil(n/2)] (4 bits); absmax [num_blocks] float32 (8 bits) or bfloat16 (4 bits)."""
    _, mids = tables(bits, x.device)
    row = 0 if signed else 1
    n = x.numel()
    nb = num_blocks(n, block_size)
    flat = x.reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, nb * block_size - n)).view(nb, block_size)
    absmax = blocks.abs().amax(1)
    if bits == 4:
        absmax = _round_up_bf16(absmax)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    xn = (blocks * (1.0 / scale)[:, None]).reshape(-1)[:n]
    code = torch.searchsorted(mids[row, : 2**bits - 1].contiguous(), xn)  # NaN: 2^bits - 1
    if not signed:
        code = torch.where((xn > 0) & (code == 0), torch.ones_like(code), code)
    code = code.to(torch.uint8)
    if bits == 4:
        code = torch.nn.functional.pad(code, (0, n % 2))
        code = code[0::2] | (code[1::2] << 4)
    else:
        code = code.reshape(x.shape)
    return code, (absmax.to(torch.bfloat16) if bits == 4 else absmax)


def dequantize(codes, absmax, numel, bits, block_size, signed):
    """float32 [numel] values of a quantized state (see quantize)."""
    qmap, _ = tables(bits, codes.device)
    c = codes.reshape(-1).to(torch.int64)
    if bits == 4:
        c = torch.stack([c & 15, c >> 4], 1).reshape(-1)[:numel]
    a = absmax.float().repeat_interleave(block_size)[:numel]
    return qmap[0 if signed else 1][c] * a


def to_float(state, scale, numel, bits, block_size, signed):
    """A state of any format as float32 [numel]."""
    if bits in (32, 16):
        return state.reshape(-1).float()
    return dequantize(state, scale, numel, bits, block_size, signed)


def store(dst, dst_scale, value, bits, block_size, signed):
    """Writes the float32 ``value`` into a state of any format, in place."""
    if bits in (32, 16):
        dst.copy_(value.reshape(dst.shape))
        return
    codes, absmax = quantize(value, bits, block_size, signed)
    dst.copy_(codes.reshape(dst.shape))
    dst_scale.copy_(absmax)


def _hash32(x):
    """lowbias32 on int64 tensors holding uint32 values (products wrap; their low 32 bits are exact)."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def sr_key(seed, i):
    """The per-tensor key of stochastic rounding: parameter i of a call seeded with ``seed``."""
    return (seed * 0x9E3779B1 + i * 0x85EBCA77) & 0xFFFFFFFF


def stochastic_round_bf16(x, key):
    """bfloat16 of the float32 tensor ``x``, rounded stochastically with the counter-based stream ``key``."""
    flat = x.reshape(-1).float()
    bits = flat.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    e = torch.arange(flat.numel(), dtype=torch.int64, device=x.device)
    r = _hash32(e ^ key) & 0xFFFF
    out = (((bits + r) >> 16) & 0xFFFF).to(torch.int32)
    out = torch.where(out >= 0x8000, out - 0x10000, out).to(torch.int16).view(torch.bfloat16)
    out = torch.where(torch.isnan(flat), flat.to(torch.bfloat16), out)  # NaN stays NaN (the sum may carry)
    return out.reshape(x.shape)


def quant_step(op, params, grads, states, scales, masters, masks, *, bits, block_size, seed=-1, **hyper):
    """One step of fused_optim's ``op`` (sgd_step, adam_step, adagrad_step, rmsprop_step) with states of ``bits``.

    states / scales: one list per state list of ``op`` in its argument order (empty when unused); scales hold the
    absmax tensors (8 and 4 bits; empty lists for 16 and 32). params/grads float32, bfloat16 or float16,
    contiguous; masters float32 or empty; masks bool or empty. ``hyper``: the fused op's keyword arguments.
    seed >= 0: stochastic rounding of bf16 parameters without masters. Updates everything in place.
    """
    if _fused._skip(hyper.get("found_inf")):
        return
    signs = SIGNED[op]
    n = len(params)
    fp32 = []
    for k, lst in enumerate(states):
        sc = scales[k] if bits in (8, 4) else [None] * len(lst)
        fp32.append([to_float(s, a, params[i].numel(), bits, block_size, signs[k]).view(params[i].shape)
                     for i, (s, a) in enumerate(zip(lst, sc))])
    sr = seed >= 0 and not masters
    work_masters = [p.float() for p in params] if sr else masters
    getattr(_fused, op)(params, grads, *fp32, work_masters, masks, **hyper)
    for k, lst in enumerate(states):
        for i in range(len(lst)):
            store(lst[i], scales[k][i] if bits in (8, 4) else None, fp32[k][i], bits, block_size, signs[k])
    if sr:
        for i in range(n):
            if params[i].dtype == torch.bfloat16:
                params[i].copy_(stochastic_round_bf16(work_masters[i], sr_key(seed, i)))
