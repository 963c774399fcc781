"""compact_states=True vs full states on a masked model: optimizer state bytes per parameter (measured from the
tensors in ``opt.state``, index included) and AdamW step time, at each state_bits, side by side in one run.

Model: ``tensors`` weights of [d, d] (plus a bias each), every weight under a random mask keeping ``1 - sparsity``
of its entries (biases unmasked). Providers are timed round-robin (harness.time_providers). Before timing, the
fp32 compact and full optimizers are checked to give identical parameters after one step.

    python bench/bench_compact_states.py [--tensors 16] [--d 512] [--sparsity 0.9] [--threads N] [--no-record]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness

import nnopt.optim as nno
from nnopt import sparsity


def make_params(tensors, d, density):
    torch.manual_seed(0)
    ps = []
    for _ in range(tensors):
        w = torch.nn.Parameter(torch.randn(d, d) * 0.02)
        sparsity.set_mask(w, torch.rand(d, d) < density)
        ps += [w, torch.nn.Parameter(torch.zeros(d))]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
        if sparsity.get_mask(p) is not None:
            sparsity.zero_pruned_(p.grad, sparsity.get_mask(p))
    return ps


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    density = 1 - a.sparsity
    n = sum(p.numel() for p in make_params(a.tensors, a.d, density))
    # Correctness: fp32 compact == full after one step.
    ref, cmp_ = make_params(a.tensors, a.d, density), make_params(a.tensors, a.d, density)
    nno.AdamW(ref, lr=1e-3).step()
    nno.AdamW(cmp_, lr=1e-3, compact_states=True).step()
    assert all(torch.equal(p, q) for p, q in zip(ref, cmp_)), "compact fp32 differs from full states"
    providers, rows = {}, []
    for bits in (32, 16, 8, 4):
        for compact in (False, True):
            ps = make_params(a.tensors, a.d, density)
            opt = nno.AdamW(ps, lr=1e-3, state_bits=bits, min_quant_size=0, compact_states=compact)
            opt.step()
            name = f"{bits}-bit {'compact' if compact else 'full'}"
            providers[name] = opt.step
            rows.append([name, state_bytes(opt) / n])
    times = harness.time_providers(providers, "cpu", repeats=7, inner=2, warmup=1)
    full = {r[0].split()[0]: times[r[0]] for r in rows if r[0].endswith("full")}
    cols = ["states", "state bytes/param (index included)", "step ms", "speed vs full states, same bits"]
    table = [dict(zip(cols, [r[0], r[1], times[r[0]] * 1e3, full[r[0].split()[0]] / times[r[0]]])) for r in rows]
    body = (f"CPU, {torch.get_num_threads()} torch threads; the machine was shared with other engineers' builds and "
            f"tests (loaded). AdamW, {a.tensors} weights [{a.d}, {a.d}] at {a.sparsity:.0%} random masks + "
            f"{a.tensors} unmasked biases ({n / 1e6:.2f}M parameters), min_quant_size=0; medians of interleaved "
            "repeats. Compact fp32 parameters checked equal to full states' before timing.\n\n"
            + harness.table(table, cols))
    print(body)
    if not a.no_record:
        harness.append_results("Issue 12: compact_states at a 90% mask (bench_compact_states.py)", body)


if __name__ == "__main__":
    main()
