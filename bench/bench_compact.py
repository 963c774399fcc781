"""Inference speed of a structurally pruned MLP: compacted (nnopt.prune.compact) vs the dense model, the same
pruning under nnopt's mask contract (zeros, no hook), and under torch.nn.utils.prune (a forward hook recomputes
``weight = weight_orig * mask`` on every call).

Model: ``depth`` × (Linear(d, d) → ReLU) then Linear(d, 10); every hidden layer loses ``sparsity`` of its output
neurons by ln_structured(n=2, dim=0) (the same masks in nnopt and torch). Each provider's output is checked
against the pruned model's before it is timed (compaction must not change the function).

    python bench/bench_compact.py [--device cpu|cuda] [--sparsity 0.5,0.75] [--quick] [--threads N] [--no-record]
"""

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness

from nnopt import prune
from nnopt.testing import tolerance


def make_mlp(d, depth, device):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(d, d), nn.ReLU()]
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers).to(device).eval()


def hidden(model):
    return [m for m in model if isinstance(m, nn.Linear)][:-1]


def providers(d, depth, sparsity, device):
    """{name: model} and the parameter counts, all computing the pruned function (dense: the unpruned one)."""
    dense = make_mlp(d, depth, device)
    masked, hooked = copy.deepcopy(dense), copy.deepcopy(dense)
    for a, b in zip(hidden(masked), hidden(hooked)):
        prune.ln_structured(a, "weight", amount=sparsity, n=2, dim=0)
        torch.nn.utils.prune.ln_structured(b, "weight", amount=sparsity, n=2, dim=0)
    compacted = copy.deepcopy(masked)
    report = prune.compact(compacted)
    if report.left_alone:
        raise AssertionError(f"compact left layers alone: {report.left_alone}")
    models = {"dense (unpruned)": dense, "nnopt masked (zeros, no hook)": masked,
              "torch.nn.utils.prune (hook)": hooked, "nnopt compacted": compacted}
    return models, report


def check(models, x):
    with torch.inference_mode():
        ref = models["nnopt masked (zeros, no hook)"](x)
        _, atol = tolerance(torch.float32, reduction_length=x.shape[1])
        scale = max(1.0, ref.abs().max().item())
        for name in ("torch.nn.utils.prune (hook)", "nnopt compacted"):
            out = models[name](x)
            err = (out - ref).abs().max().item()
            if err > atol * scale * 10:
                raise AssertionError(f"{name}: max abs difference {err:.3g} from the masked model")


def run(device="cpu", sparsities=(0.5, 0.75), quick=False, record=True, repeats=None, threads=None):
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    d, depth = (1024, 3) if quick else ((4096, 4) if cuda else (2048, 4))
    batch = (64 if quick else 256) if not cuda else (1024 if quick else 8192)
    repeats = repeats or (5 if quick else 15)
    x = torch.randn(batch, d, device=device)
    rows = []
    for s in sparsities:
        models, report = providers(d, depth, s, device)
        check(models, x)
        fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
        with torch.inference_mode():
            times = harness.time_providers(fns, device, repeats=repeats, inner=3 if not cuda else 10)
        base, hook = times["dense (unpruned)"], times["torch.nn.utils.prune (hook)"]
        for name, t in times.items():
            n = report.params_after if name == "nnopt compacted" else report.params_before
            rows.append({"sparsity (neurons)": s, "provider": name, "parameters (M)": n / 1e6, "ms": 1e3 * t,
                         "speedup vs dense": base / t, "speedup vs torch hook": hook / t})
        print(f"  sparsity {s}: " + "  ".join(f"{k}={1e3 * t:.2f}ms" for k, t in times.items()), flush=True)
    cols = ["sparsity (neurons)", "provider", "parameters (M)", "ms", "speedup vs dense", "speedup vs torch hook"]
    body = (f"MLP {depth} × Linear({d}, {d}) + ReLU → Linear({d}, 10), fp32, batch {batch}, {device}, inference "
            "(eval, inference_mode); hidden layers pruned by ln_structured(n=2, dim=0). Medians of "
            f"{repeats} interleaved repeats.\n\n" + harness.table(rows, cols))
    print("\n" + body)
    if record:
        harness.append_results(f"bench_compact ({device}{', quick' if quick else ''})", body)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sparsity", default="0.5,0.75")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    run(a.device, tuple(float(s) for s in a.sparsity.split(",")), a.quick, not a.no_record, a.repeats, a.threads)


if __name__ == "__main__":
    main()
