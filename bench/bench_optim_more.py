"""Optimizer step benchmark for NAdam, RAdam, Adamax, Lion, LAMB, Adafactor and Muon: nnopt against torch's fastest
mode for each (foreach; torch has no fused kernel for these) or, where torch has no such optimizer, a foreach-style
plain-torch reference (Lion, LAMB); Muon against torch.optim.Muon on a GPT-2-small-shaped set of matrices.

Models: ``many`` — bench_optim's 1,207 tensors, 16.8M parameters; ``gpt2`` (Muon) — the 2-D weights of a 12-layer
GPT-2-small-shaped model (768 hidden, 3072 MLP; embeddings excluded, as Muon is meant for hidden matrices). Every
provider is checked against the oracle (torch.optim's for-loop path or the plain-torch reference) before timing.

    python bench/bench_optim_more.py [--optimizers NAdam,RAdam,...] [--quick] [--no-record]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_optim  # noqa: E402
import harness  # noqa: E402

import nnopt.optim  # noqa: E402
from nnopt.testing import tolerance  # noqa: E402


@torch.no_grad()
def foreach_lion(params, states, lr, betas, weight_decay):
    """Lion with torch's foreach ops: what a user without nnopt would write for speed (lion-pytorch's form)."""
    grads = [p.grad for p in params]
    beta1, beta2 = betas
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    update = torch._foreach_mul(states, beta1)
    torch._foreach_add_(update, grads, alpha=1 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_mul_(states, beta2)
    torch._foreach_add_(states, grads, alpha=1 - beta2)


class ForeachLion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def step(self):
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            ms = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in ps]
            foreach_lion(ps, ms, g["lr"], g["betas"], g["weight_decay"])


class ForeachLAMB(torch.optim.Optimizer):
    """apex FusedLAMB's semantics (adam_w_mode, grad averaging, global clipping) written with torch's foreach ops
    and _foreach_norm: the fastest plain-torch LAMB (no Python op per tensor, no host read)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm))
        self.steps = 0

    @torch.no_grad()
    def step(self):
        self.steps += 1
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in ps]
            for p in ps:
                if not self.state[p]:
                    self.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            beta1, beta2 = group["betas"]
            bc1, bc2 = 1 - beta1**self.steps, 1 - beta2**self.steps
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            mx = group["max_grad_norm"]
            clip = torch.where(norm > mx, norm / mx, 1.0) if mx > 0 else torch.ones(())
            g = torch._foreach_div(grads, clip)
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, g, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, g, g, value=1 - beta2)
            denom = torch._foreach_div(vs, bc2)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            u = torch._foreach_div(ms, bc1)
            torch._foreach_div_(u, denom)
            torch._foreach_add_(u, ps, alpha=group["weight_decay"])
            pn, un = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(u))
            ratio = torch.where((pn > 0) & (un > 0), pn / un, 1.0) * group["lr"]
            torch._foreach_mul_(u, list(ratio.unbind(0)))
            torch._foreach_sub_(ps, u)


def gpt2_matrices():
    """The 2-D weights of a 12-layer GPT-2-small-shaped model (nn.Linear layout): qkv, attention out, MLP in/out."""
    return [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12


# name -> (kwargs, baselines {label: constructor(params)}, oracle constructor, model)
def cases():
    torch_modes = lambda name, kw: {  # noqa: E731
        "torch for-loop": lambda ps: getattr(torch.optim, name)(ps, foreach=False, **kw),
        "torch foreach": lambda ps: getattr(torch.optim, name)(ps, foreach=True, **kw),
    }
    out = {}
    for name, kw in [("NAdam", dict(lr=1e-3, weight_decay=1e-2)), ("RAdam", dict(lr=1e-3, weight_decay=1e-2)),
                     ("Adamax", dict(lr=1e-3, weight_decay=1e-2))]:
        out[name] = (kw, torch_modes(name, kw), lambda ps, name=name, kw=kw: getattr(torch.optim, name)(
            ps, foreach=False, **kw))
    kw = dict(lr=1e-4, weight_decay=0.1)
    out["Lion"] = (kw, {"torch foreach (reference)": lambda ps, kw=kw: ForeachLion(ps, **kw)},
                   lambda ps, kw=kw: ForeachLion(ps, **kw))
    kw = dict(lr=1e-3, weight_decay=0.01)
    out["LAMB"] = (kw, {"torch foreach (reference)": lambda ps, kw=kw: ForeachLAMB(ps, **kw)},
                   lambda ps, kw=kw: nnopt.optim.LAMB(ps, backend="torch", **kw))
    kw = dict(lr=1e-2, weight_decay=0.01)
    out["Adafactor"] = (kw, torch_modes("Adafactor", kw),
                        lambda ps, kw=kw: torch.optim.Adafactor(ps, foreach=False, **kw))
    kw = dict(lr=0.02)
    out["Muon"] = (kw, {"torch.optim.Muon": lambda ps, kw=kw: torch.optim.Muon(ps, **kw)},
                   lambda ps, kw=kw: torch.optim.Muon(ps, **kw), "gpt2")
    return {k: v if len(v) == 4 else v + ("many",) for k, v in out.items()}


def check(provs, ps, oracle, name):
    ref = bench_optim.clone(ps)
    oracle(ref).step()
    rtol, atol = tolerance(torch.float32)
    for label, (step, qs) in provs.items():
        step()
        for q, r in zip(qs, ref):
            if not torch.allclose(q.detach(), r.detach(), rtol=rtol * 10, atol=atol * 10):
                raise AssertionError(f"{label} ({name}) disagrees with the oracle after one step")


def run(names, quick=False, record=True, repeats=None):
    repeats = repeats or (5 if quick else 11)
    rows, summary = [], []
    all_cases = cases()
    models = {"many": bench_optim.shapes("many", "cpu", quick),
              "gpt2": gpt2_matrices()[:8] if quick else gpt2_matrices()}
    params = {}
    for name in names:
        kw, baselines, oracle, model = all_cases[name]
        if model not in params:
            params[model] = bench_optim.make_params(models[model], "cpu")
        ps = params[model]
        provs = {}
        for label, make in baselines.items():
            qs = bench_optim.clone(ps)
            provs[label] = (make(qs).step, qs)
        qs = bench_optim.clone(ps)
        extra = {} if name == "Muon" else dict(backend="cpu")  # Muon: its Newton–Schulz chain has no backend
        provs["nnopt cpu"] = (getattr(nnopt.optim, name)(qs, **extra, **kw).step, qs)
        check(provs, ps, oracle, name)
        slow = model == "gpt2"  # seconds per step: fewer samples, one call each
        times = harness.time_providers({k: v[0] for k, v in provs.items()}, "cpu",
                                       repeats=min(repeats, 3) if slow else repeats, inner=1 if slow else 3,
                                       warmup=1 if slow else 2)
        best = min(t for k, t in times.items() if not k.startswith("nnopt"))
        n = sum(p.numel() for p in ps)
        where = f"{model} ({n / 1e6:.1f}M parameters in {len(ps)} tensors)"
        for k, t in times.items():
            rows.append({"optimizer": name, "model": where, "provider": k, "ms/step": 1e3 * t,
                         "speedup vs best torch": best / t})
        summary.append((name, best / times["nnopt cpu"]))
        print(f"  {name:9s} " + "  ".join(f"{k}={1e3 * t:.2f}ms" for k, t in times.items()), flush=True)
    body = ("fp32, cpu; many = bench_optim's 1,207-tensor model, gpt2 = the 48 matrices of a 12-layer "
            "GPT-2-small-shaped model. Medians of interleaved repeats.\n\n"
            + harness.table(rows, ["optimizer", "model", "provider", "ms/step", "speedup vs best torch"]))
    print("\n" + body)
    if record:
        harness.append_results(f"bench_optim_more (cpu{', quick' if quick else ''})", body)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default=",".join(cases()))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    run(a.optimizers.split(","), a.quick, not a.no_record, a.repeats)


if __name__ == "__main__":
    main()
