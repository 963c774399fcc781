"""Compact states (``compact_states=True``): optimizer states stored only for the entries a parameter's mask keeps.

A masked parameter ``p`` (n elements, k kept by ``nnopt.sparsity.get_mask(p)``) keeps in ``opt.state[p]``:

- every state slot packed: the group's format (fp32 / bf16 / 8- or 4-bit codes + scales) of a [k] vector holding
  the kept entries in row-major order; ``master_param`` (masters) packed the same way, fp32 [k];
- ``kept_index``: uint8 [ceil(m/2)], the kept positions as m 4-bit gap codes, two per byte. Each kept position
  is the previous one + 1 + r; r is written as floor(r/15) codes 15 ("15 more, no entry") then the code r % 15.
  So m <= k + n/15: at most k/2 + n/30 bytes (0.083 B/param at 10% kept; 0.06 for a random 10% mask), less than
  a bitmap (n/8) or any per-entry index; the positions come back with one cumulative sum (``decode_index``).

The step gathers the kept entries of the parameter and its gradient into [k] temporaries, runs the same fused
kernel as full states on them (one call per parameter), and scatters the parameter back (pruned entries are not
written: they hold 0 by the mask contract). Cost over a full-state masked step, for 10x less state: on CPU two
parallel passes over the mask (nnopt::kept_gather, kept_scatter_: csrc/cpu/kept_gather.cpp) and 3k element
copies; elsewhere one nonzero over the mask, whose [k] positions live only during the step, and the same copies.
When a mask changes (a new mask object, or an in-place edit), the states are remapped: entries kept by both
masks keep their values, regrown entries start at zero (Adagrad: at ``initial_accumulator_value``; masters: at the
parameter's value), newly pruned ones are dropped.
"""

import torch

_ESC = 15


def encode_index(mask):
    """uint8 [ceil(m/2)] gap codes of the True positions of ``mask`` (any shape, row-major order)."""
    pos = mask.reshape(-1).nonzero().reshape(-1)
    if pos.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8, device=mask.device)
    prev = torch.cat([pos.new_full((1,), -1), pos[:-1]])
    r = pos - prev - 1
    reps = r // _ESC + 1  # codes per kept entry
    ends = reps.cumsum(0)
    codes = torch.full((int(ends[-1]),), _ESC, dtype=torch.uint8, device=mask.device)
    codes[ends - 1] = (r % _ESC).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), _ESC)])  # padding: an escape with no entry after it
    return codes[0::2] | (codes[1::2] << 4)


def decode_index(index):
    """int64 [k] kept positions from ``encode_index``'s codes."""
    codes = torch.stack([index & 0xF, index >> 4], dim=1).reshape(-1).long()
    emit = codes != _ESC
    pos = (codes + emit.long()).cumsum(0) - 1
    return pos[emit]


def index_bytes_bound(n, k):
    """The most bytes ``encode_index`` uses for k kept of n entries."""
    return (k + n // _ESC + 2) // 2
