"""Block-sparse masked linear benchmark: nnopt's kernels against the dense layer they replace and torch's own
block-sparse (BSR) matmul.

Tables:
  bars        x [256, 4096], W [4096, 4096], fp32, 32×32 tiles kept at random (each kept tile entirely true) at
              block sparsity 0/50/75/90/95/99%. ``forward``: y = x (W ⊙ mask)ᵀ + b. ``fwd+bwd``: y, dx = dy (W ⊙ mask)
              and dW = (dyᵀ x) ⊙ mask. Providers: ``torch dense`` (the unpruned layer: F.linear, dy @ W, dyᵀ @ x),
              ``torch masked`` (nnopt.reference: torch.where, then the same dense products), ``torch BSR`` (W ⊙ mask
              as a BSR tensor of 32×32 blocks: bsr @ xᵀ; dx with a BSR of (W ⊙ mask)ᵀ; dW by CSR sampled_addmm on
              the mask, torch having no BSR sampled product on CPU), and ``nnopt <backend>`` (cpu: the C++ kernels,
              csrc/cpu/masked_linear.cpp; triton on CUDA). Speedup = torch dense time ÷ provider time, same run.
  decode      inference at decode shapes: x [B, 4096] for B = 1 and 8, W [4096, 4096] at 90% block sparsity (32×32
              tiles), fp32 and bf16 (bf16 against torch's bf16 F.linear). Providers: ``torch dense`` (nn.Linear under
              no_grad), ``nnopt packed`` (nnopt::masked_linear_packed on panels packed once) and ``nnopt
              MaskedLinear (auto)`` (the layer's call: auto, packed panels cached on the module).
  break-even  forward speedup over dense F.linear against sparsity (0-99%) for 16-, 32- and 64-sided tiles and for
              unstructured (elementwise random) masks, whose tiles are almost all non-empty: the worst case.
The block layout and the BSR conversions are built once per mask, outside the timings (MaskedLinear caches its
layout until the mask changes). Every provider's outputs are checked against float64 before it is timed.

    python bench/bench_masked_linear.py [--device cpu|cuda] [--quick] [--repeats N] [--tables bars,decode,break-even]
                                        [--threads N] [--no-append]
"""

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from nnopt import backends  # noqa: E402
from nnopt.nn.functional import masked_linear  # noqa: E402
from nnopt.nn.layout import BlockLayout  # noqa: E402
from nnopt.reference import masked_linear as ref  # noqa: E402
from nnopt.testing import assert_close  # noqa: E402

FAMILY = "masked_linear"
BAR_SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95, 0.99)
BREAK_EVEN_SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
BREAK_EVEN_MASKS = ("16×16", "32×32", "64×64", "unstructured")
# The bars this family promises on CPU: (table, sparsity) -> minimum speedup over torch dense.
BARS = {("forward", 0.9): 5.0, ("forward", 0.95): 10.0, ("fwd+bwd", 0.9): 3.0}
DECODE_BARS = {("fp32", 1): 6.0, ("fp32", 8): 6.0, ("bf16", 1): 5.0}


def shape(quick):
    """(M, N, K): rows of x, out_features, in_features."""
    return (64, 512, 512) if quick else (256, 4096, 4096)


def make_inputs(m, n, k, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, w, b, dy = (torch.randn(s, generator=gen).to(device) for s in ((m, k), (n, k), (n,), (m, n)))
    return x, w, b, dy


def block_mask(n, k, block, sparsity, device, seed=1):
    """Exactly round((1 - sparsity) · tiles) block × block tiles kept, chosen at random; kept tiles are all true."""
    gen = torch.Generator().manual_seed(seed)
    nb, kb = -(-n // block), -(-k // block)
    keep = torch.zeros(nb * kb, dtype=torch.bool)
    keep[torch.randperm(nb * kb, generator=gen)[:round((1 - sparsity) * nb * kb)]] = True
    mask = keep.view(nb, kb).repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return mask.contiguous().to(device)


def unstructured_mask(n, k, sparsity, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, k, generator=gen) >= sparsity).to(device)


def nnopt_backends(device):
    """The nnopt backends worth timing on ``device`` (the Triton interpreter on CPU is a test tool, not a provider)."""
    dev = torch.device(device).type
    out = []
    for b in ("cpu", "triton"):
        if b == "triton" and dev == "cpu":
            continue
        if backends.missing(b, device, FAMILY) is None:
            out.append(b)
    return out


def _bsr(weight, mask, block):
    """(W ⊙ mask) and its transpose as BSR tensors, or None where torch cannot build or multiply them here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse BSR support is in beta"
            wm = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
            bsr = wm.to_sparse_bsr((block, block))
            bsr_t = wm.t().contiguous().to_sparse_bsr((block, block))
            mask_csr = mask.to(weight.dtype).to_sparse_csr()
        return bsr, bsr_t, mask_csr
    except (RuntimeError, NotImplementedError):
        return None


def forward_providers(x, w, b, mask, layout, block):
    """{name: (fn, expected fn)}: each fn computes the layer's forward; expected gives its float64 value."""
    x64, w64, b64 = x.double(), w.double(), b.double()
    dense_expected = lambda: F.linear(x64, w64, b64)  # noqa: E731
    masked_expected = lambda: ref.masked_linear(x64, w64, mask, b64)  # noqa: E731
    provs = {"torch dense": (lambda: F.linear(x, w, b), dense_expected),
             "torch masked": (lambda: ref.masked_linear(x, w, mask, b), masked_expected)}
    bsr = _bsr(w, mask, block) if block else None
    if bsr is not None:
        provs["torch BSR"] = (lambda: torch.addmm(b[:, None], bsr[0], x.t()).t(), masked_expected)
    # The nnopt providers read the pruned weight (zeros in place, as a pruned layer holds it), a tensor of its own:
    # reading `w` right after torch dense did would find part of it still in the L3 cache and flatter them.
    wm = w.masked_fill(~mask, 0)
    for name in nnopt_backends(x.device):
        impl = backends.implementation(FAMILY, name)
        provs[f"nnopt {name}"] = (lambda impl=impl: impl.masked_linear(x, wm, mask, b, layout), masked_expected)
    # The layer as a user runs it: MaskedLinear's call (weight holding its zeros), auto choosing dense or sparse.
    provs["nnopt MaskedLinear (auto)"] = (
        lambda: masked_linear(x, wm, mask, b, "auto", layout=layout, weight_is_masked=True), masked_expected)
    return provs


def training_providers(x, w, b, dy, mask, layout, block):
    """{name: (fn, expected fn)}: fn returns (y, dx, dW) of one forward and backward."""
    x64, w64, b64, dy64 = x.double(), w.double(), b.double(), dy.double()

    def dense_expected():
        return F.linear(x64, w64, b64), dy64 @ w64, dy64.t() @ x64

    def masked_expected():
        return (ref.masked_linear(x64, w64, mask, b64), ref.masked_linear_dx(dy64, w64, mask),
                ref.masked_linear_dw(dy64, x64, mask))

    provs = {"torch dense": (lambda: (F.linear(x, w, b), dy @ w, dy.t() @ x), dense_expected),
             "torch masked": (lambda: (ref.masked_linear(x, w, mask, b), ref.masked_linear_dx(dy, w, mask),
                                       ref.masked_linear_dw(dy, x, mask)), masked_expected)}
    bsr = _bsr(w, mask, block) if block else None
    if bsr is not None:
        bsr_w, bsr_t, mask_csr = bsr
        dy_t = dy.t().contiguous()
        provs["torch BSR"] = (lambda: (torch.addmm(b[:, None], bsr_w, x.t()).t(), (bsr_t @ dy.t()).t(),
                                       torch.sparse.sampled_addmm(mask_csr, dy_t, x, beta=0.0)), masked_expected)
    wm = w.masked_fill(~mask, 0).requires_grad_()  # the pruned weight (see forward_providers)
    wd = wm.detach()
    for name in nnopt_backends(x.device):
        impl = backends.implementation(FAMILY, name)
        provs[f"nnopt {name}"] = (lambda impl=impl: (impl.masked_linear(x, wd, mask, b, layout),
                                                     impl.masked_linear_dx(dy, wd, mask, layout),
                                                     impl.masked_linear_dw(dy, x, mask, layout)), masked_expected)
    xr = x.detach().clone().requires_grad_()

    def layer():  # MaskedLinear's autograd path: forward, then backward for dx and dW (auto: dense or sparse)
        wm.grad = xr.grad = None
        y = masked_linear(xr, wm, mask, b, "auto", layout=layout, weight_is_masked=True)
        y.backward(dy)
        return y.detach(), xr.grad, wm.grad

    provs["nnopt MaskedLinear (auto)"] = (layer, masked_expected)
    return provs


def checked(provs, reductions, where):
    """The providers whose outputs match their float64 expectation; the others are dropped with a message."""
    out = {}
    for name, (fn, expected) in provs.items():
        try:
            got, want = fn(), expected()
            if isinstance(got, torch.Tensor):
                got, want = (got,), (want,)
            for g, e, red in zip(got, want, reductions):
                g = g.to_dense() if g.layout != torch.strided else g
                assert_close(g, e.to(g.dtype), reduction_length=red, msg=f"{name} ({where})")
            out[name] = fn
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            if name.startswith("nnopt") or name == "torch dense":
                raise
            print(f"  {name} skipped at {where}: {str(e).splitlines()[0][:160]}", flush=True)
    return out


def bars(device, quick, repeats, inner):
    """The bar table: rows (table, sparsity, provider) with ms and speedup over torch dense."""
    m, n, k = shape(quick)
    x, w, b, dy = make_inputs(m, n, k, device)
    rows, summary = [], {}
    for sparsity in BAR_SPARSITIES:
        mask = block_mask(n, k, 32, sparsity, device)
        layout = BlockLayout(mask, 32, 32)
        for table, provs, reductions in (
                ("forward", forward_providers(x, w, b, mask, layout, 32), (k,)),
                ("fwd+bwd", training_providers(x, w, b, dy, mask, layout, 32), (k, n, m))):
            fns = checked(provs, reductions, f"{table}, {sparsity:.0%}")
            times = harness.time_providers(fns, device, repeats=repeats, inner=inner)
            dense = times["torch dense"]
            for name, t in times.items():
                rows.append({"pass": table, "block sparsity": f"{sparsity:.0%}", "provider": name, "ms": 1e3 * t,
                             "speedup vs dense": f"{dense / t:.2f}x"})
                if name.startswith("nnopt"):
                    summary[(table, sparsity, name)] = dense / t
            print(f"  {table:8s} {sparsity:4.0%}  " + "  ".join(f"{p}={1e3 * t:.2f}ms" for p, t in times.items()),
                  flush=True)
    text = (f"x [{m}, {k}], W [{n}, {k}], fp32, 32×32 tiles kept at random (kept tiles entirely true), {device}. "
            "Speedup = torch dense (the unpruned layer) time ÷ provider time, medians of interleaved repeats.\n\n"
            + harness.table(rows, ["pass", "block sparsity", "provider", "ms", "speedup vs dense"]))
    return text, summary


def decode(device, quick, repeats, inner):
    """The decode table (CPU): rows (dtype, B, provider) with ms and speedup over torch dense; and the bar lines."""
    from nnopt.nn import MaskedLinear

    n = k = 512 if quick else 4096
    mask = block_mask(n, k, 32, 0.9, device)
    rows, lines = [], []
    for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        dense = torch.nn.Linear(k, n).to(dtype)
        layer = MaskedLinear.from_linear(torch.nn.Linear(k, n), mask).to(dtype)  # its own (pruned) weight
        ops = torch.ops.nnopt
        lay = BlockLayout(mask, 32, 32)
        packed = ops.masked_linear_pack(layer.weight, mask, lay.row_ptr, lay.col_idx, lay.full, 32, 32)
        for b in (1, 8):
            x = torch.randn(b, k).to(dtype)
            with torch.no_grad():
                want = ref.masked_linear(x.double(), layer.weight.double(), mask, layer.bias.double())
                provs = {"torch dense": lambda: dense(x),
                         "nnopt packed": lambda: ops.masked_linear_packed(x, packed, layer.bias, lay.row_ptr,
                                                                          lay.col_idx, n, 32, 32),
                         "nnopt MaskedLinear (auto)": lambda: layer(x)}
                for name in ("nnopt packed", "nnopt MaskedLinear (auto)"):
                    assert_close(provs[name](), want.to(dtype), reduction_length=k, msg=f"{name} decode {dt} B={b}")
                times = harness.time_providers(provs, device, repeats=repeats, inner=inner)
            for name, t in times.items():
                speedup = times["torch dense"] / t
                rows.append({"dtype": dt, "B": b, "provider": name, "ms": 1e3 * t,
                             "speedup vs dense": f"{speedup:.2f}x"})
            auto = times["torch dense"] / times["nnopt MaskedLinear (auto)"]
            bar = DECODE_BARS.get((dt, b))
            if bar is not None:
                lines.append(f"- decode {dt} B={b}, MaskedLinear (auto): {auto:.2f}x (bar {bar:g}x: "
                             f"{'met' if auto >= bar else 'missed'})")
            print(f"  decode {dt} B={b}  " + "  ".join(f"{p}={1e3 * t:.3f}ms" for p, t in times.items()), flush=True)
    text = (f"Inference (no_grad), x [B, {k}], W [{n}, {k}] at 90% block sparsity (32×32 tiles), {device}. "
            "Speedup = torch dense (nn.Linear, same dtype) time ÷ provider time, medians of interleaved repeats.\n\n"
            + harness.table(rows, ["dtype", "B", "provider", "ms", "speedup vs dense"]))
    return text, lines


def break_even(device, quick, repeats, inner):
    """Forward speedup over dense F.linear against sparsity, per mask structure: the matrix as Markdown."""
    m, n, k = shape(quick)
    x, w, b, _ = make_inputs(m, n, k, device)
    names = nnopt_backends(device)
    rows, curve = [], []
    for sparsity in BREAK_EVEN_SPARSITIES:
        row = {"sparsity": f"{sparsity:.0%}"}
        for kind in BREAK_EVEN_MASKS:
            if kind == "unstructured":
                mask, block = unstructured_mask(n, k, sparsity, device), 32
            else:
                block = int(kind.split("×")[0])
                mask = block_mask(n, k, block, sparsity, device)
            layout = BlockLayout(mask, block, block)
            provs = {name: p for name, p in forward_providers(x, w, b, mask, layout, None).items()
                     if name == "torch dense" or name.startswith("nnopt")}
            times = harness.time_providers(checked(provs, (k,), f"break-even {kind} {sparsity:.0%}"), device,
                                           repeats=repeats, inner=inner)
            for name in names:
                label = kind if len(names) == 1 else f"{kind} {name}"
                row[label] = f"{times['torch dense'] / times['nnopt ' + name]:.2f}x"
            auto = times["torch dense"] / times["nnopt MaskedLinear (auto)"]
            row[f"{kind} auto"] = f"{auto:.2f}x"
            curve.append(dict(block=kind, sparsity=sparsity, speedup=auto))
            row["dense ms"] = 1e3 * times["torch dense"]
            print(f"  break-even {sparsity:4.0%} {kind:12s} " + "  ".join(f"{p}={1e3 * t:.2f}ms"
                                                                       for p, t in times.items()), flush=True)
        rows.append(row)
    cols = ["sparsity"] + [c for c in rows[0] if c not in ("sparsity", "dense ms")] + ["dense ms"]
    text = (f"Forward speedup of nnopt over torch dense F.linear, x [{m}, {k}], W [{n}, {k}], fp32, {device}; "
            "block masks keep whole tiles at random, unstructured masks keep entries at random (layout: 32×32 "
            "tiles, nearly all non-empty). `auto`: MaskedLinear's call, choosing dense F.linear or the kernels "
            "per layer from the cost model in nnopt/nn/dispatch.py.\n\n" + harness.table(rows, cols))
    return text, curve


def run(device="cpu", quick=False, repeats=None, tables=("bars", "decode", "break-even"), append=True, threads=None):
    if threads:
        torch.set_num_threads(threads)
    repeats = repeats or (5 if quick else 11)
    inner = 5 if quick else 1  # quick shapes take well under a millisecond a call
    print(f"masked_linear on {device}: {harness.machine()}; nnopt backends: {', '.join(nnopt_backends(device))}",
          flush=True)
    sections, summary = [], {}
    if "bars" in tables:
        text, summary = bars(device, quick, repeats, inner)
        sections.append("### Forward and forward+backward against the dense layer\n\n" + text)
    decode_lines = []
    if "decode" in tables and torch.device(device).type == "cpu":
        text, decode_lines = decode(device, quick, max(repeats, 15), 5 if quick else 3)
        sections.append("### Decode shapes (inference, B = 1 and 8)\n\n" + text)
    curve = []
    if "break-even" in tables:
        text, curve = break_even(device, quick, repeats, inner)
        sections.append("### Break-even: forward speedup against sparsity\n\n" + text)
    lines = list(decode_lines) if not quick else []
    for (table, sparsity), bar in BARS.items():
        for (t, s, name), speedup in summary.items():
            if (t, s) == (table, sparsity):
                verdict = "met" if speedup >= bar else "missed"
                lines.append(f"- {table} at {sparsity:.0%}, {name}: {speedup:.2f}x (bar {bar:g}x: {verdict})")
    autos = [v for (t, sp, name), v in summary.items() if "auto" in name] + [c["speedup"] for c in curve]
    if autos:
        worst = min(autos)
        lines.append(f"- MaskedLinear (auto) never below 0.95x dense: worst {worst:.2f}x "
                     f"({'met' if worst >= 0.95 else 'missed'})")
    if lines:
        sections.append("Bars (promised on CPU at full size, vs torch dense):\n\n" + "\n".join(lines))
    body = "\n\n".join(sections)
    print("\n" + body)
    if append:
        harness.append_results(f"bench_masked_linear ({device}{', quick' if quick else ''})", body)
    return [dict(table=t, sparsity=sp, provider=name, speedup_vs_dense=v) for (t, sp, name), v in summary.items()] \
        + curve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="x [64, 512], W [512, 512], 3 repeats: seconds")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tables", default="bars,decode,break-even")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-append", "--no-record", dest="no_append", action="store_true",
                    help="do not append the tables to bench/RESULTS.md")
    a = ap.parse_args(argv)
    run(a.device, a.quick, a.repeats, tuple(a.tables.split(",")), not a.no_append, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
