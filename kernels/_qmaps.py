"""The quantization maps of the quant_optim family (plain torch, no Triton): bitsandbytes' dynamic maps and their
midpoints, shared by nnopt.reference.quant_optim (which defines the formats) and the Triton kernels."""

import functools
import math

import torch


def dynamic_map(signed, bits):
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits, total_bits): 2^bits float32 values in [-1, 1]."""
    max_exp = 7 if bits == 8 else 3
    non_sign = bits - 1
    data = []
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1 if signed else 2 ** (i + non_sign - max_exp + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float64)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (-(max_exp - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2**bits
    return torch.tensor(sorted(data), dtype=torch.float64).to(torch.float32)


@functools.lru_cache(maxsize=None)
def tables(bits):
    """(qmap [2, 2^bits] float32: signed row 0, unsigned row 1;  mids [2, 2^bits] float32: the 2^bits - 1
    midpoints of each row, then +inf, so a branch-free binary search of 2^bits entries counts them)."""
    maps = torch.stack([dynamic_map(True, bits), dynamic_map(False, bits)])
    q64 = maps.double()
    mids = ((q64[:, :-1] + q64[:, 1:]) / 2).float()
    return maps, torch.cat([mids, torch.full((2, 1), math.inf)], 1)
