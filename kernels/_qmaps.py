"""The quantization maps of the quant_optim family (plain torch, no Triton): bitsandbytes' dynamic maps (the 4-bit
unsigned one linear) and their midpoints, shared by nnopt.reference.quant_optim (which defines the formats) and the
kernels (every backend takes the tables as tensors)."""

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


def state_map(signed, bits):
    """The map a state of this signedness is stored with: the dynamic map, except 4-bit unsigned states (second
    moments, squared sums), which take 16 evenly spaced values 0, 1/15, ..., 1, as torchao's AdamW4bit and Li et al.
    2023 ("Memory efficient optimizers with 4-bit states") do. The dynamic map spends 8 of its 16 values on the
    two decades below 0.1, so a block's bulk lands in gaps up to 0.11 wide (a second moment read up to 36% low):
    GPT-2 byte LMs trained with it ended 2.9% above fp32 AdamW (one seed of three stalled early), 1.2% with the
    linear map (bench/RESULTS.md). 0 stays a value, so masked states stay exactly 0."""
    if bits == 4 and not signed:
        return torch.linspace(0, 1, 16, dtype=torch.float64).to(torch.float32)
    return dynamic_map(signed, bits)


@functools.lru_cache(maxsize=None)
def tables(bits):
    """(qmap [2, 2^bits] float32: signed row 0, unsigned row 1;  mids [2, 2^bits] float32: the 2^bits - 1
    midpoints of each row, then +inf, so a branch-free binary search of 2^bits entries counts them)."""
    maps = torch.stack([state_map(True, bits), state_map(False, bits)])
    q64 = maps.double()
    mids = ((q64[:, :-1] + q64[:, 1:]) / 2).float()
    return maps, torch.cat([mids, torch.full((2, 1), math.inf)], 1)
