"""One-shot pruning (Wanda, SparseGPT) against magnitude: quality on real text, reconstruction, speed and memory.

    python bench/bench_oneshot.py text    [--steps 1500] [--cache /tmp/oneshot_lm.pt] [--plot bench/oneshot_ppl.png]
    python bench/bench_oneshot.py recon   # one layer, correlated unequally scaled inputs: output error ratios
    python bench/bench_oneshot.py speed   # one 4096×4096 layer, 128×2048 calibration tokens
    python bench/bench_oneshot.py hessian # each Hessian mode's error against float64 and its effect on SparseGPT
    python bench/bench_oneshot.py memory  # peak extra memory of a whole-model SparseGPT run (VmHWM)

text: a GPT-2-style byte LM (transformers config, random init) trained on this machine on the standard library's
sources (nnopt.demo.text), pruned with 128 calibration sequences from the training split, evaluated on held-out
windows: perplexity at 50% unstructured, 2:4 and 70% for dense, magnitude (per-layer L1; N:M by magnitude along
the inputs), Wanda and SparseGPT, on the same layers (every linear layer of the blocks; embeddings and the tied
lm_head dense). Every part appends a dated entry to bench/RESULTS.md.
"""

import argparse
import copy
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import nnopt.prune as prune  # noqa: E402
from nnopt.layers import in_dim  # noqa: E402
from nnopt.prune import oneshot  # noqa: E402

SETTINGS = [("50%", "unstructured", 0.5), ("2:4", "2:4", None), ("70%", "unstructured", 0.7)]
METHODS = ("magnitude", "wanda", "wanda (layer)", "sparsegpt")
OWL = (5, 0.08)  # the OWL paper's M and lambda
ONESHOT = {"wanda": lambda m, c, s, p: prune.wanda(m, c, s, pattern=p),
           "wanda (layer)": lambda m, c, s, p: prune.wanda(m, c, s, pattern=p, comparison="layer"),
           "sparsegpt": lambda m, c, s, p: prune.sparsegpt(m, c, s, pattern=p),
           "sparsegpt (bf16 H)": lambda m, c, s, p: prune.sparsegpt(m, c, s, pattern=p,
                                                                   hessian_dtype=torch.bfloat16),
           "wanda+owl": lambda m, c, s, p: prune.wanda(m, c, s, pattern=p, owl=OWL),
           "sparsegpt+owl": lambda m, c, s, p: prune.sparsegpt(m, c, s, pattern=p, owl=OWL)}
TEXT_METHODS = METHODS + ("wanda+owl", "sparsegpt+owl")
RECON_METHODS = METHODS + ("sparsegpt (bf16 H)",)
HDT_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", "split": "'split'", None: "None (default)"}
ARCH_NAMES = {"gpt2": "GPT-2-style (LayerNorm, GELU MLP)", "llama": "Llama-style (RMSNorm, SwiGLU MLP)"}


def magnitude(model, pattern, sparsity):
    """Per-layer magnitude pruning of the layers one-shot pruning takes (N:M along each layer's input dim)."""
    _, by_block = oneshot.select(model)
    for layers in by_block.values():
        for _, m in layers:
            if pattern == "unstructured":
                prune.l1_unstructured(m, "weight", amount=sparsity)
            else:
                n, mm = map(int, pattern.split(":"))
                prune.nm_structured(m, "weight", n, mm, dim=in_dim(m))


def train_lm(args, corpus):
    from nnopt.demo import lm

    model = lm.build(args.arch, d_model=args.d_model, n_layers=args.layers, n_heads=4, seq_len=args.seq)
    if args.cache and os.path.exists(args.cache):
        saved = torch.load(args.cache)
        model.load_state_dict(saved["state"])
        print(f"loaded the trained model from {args.cache} (trained in {saved['seconds']:.0f} s)")
        return model, saved["seconds"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.perf_counter()

    def progress(step, loss):
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss:.3f}  {time.perf_counter() - t0:.0f} s", flush=True)

    lm.train(model, corpus, opt, args.steps, batch_size=args.batch, seq_len=args.seq, callback=progress)
    seconds = time.perf_counter() - t0
    if args.cache:
        torch.save({"state": model.state_dict(), "seconds": seconds}, args.cache)
    return model, seconds


def run_text(args):
    from nnopt.demo import lm, text

    torch.manual_seed(0)
    corpus = text.corpus(max_bytes=args.bytes)
    model, train_s = train_lm(args, corpus)
    held = corpus.windows("heldout", args.seq, args.eval_windows)
    gen = torch.Generator().manual_seed(1234)
    calib = corpus.batch("train", 128, args.seq, gen)
    calibration = [calib[i:i + 16] for i in range(0, 128, 16)]
    dense = lm.evaluate(model, held)[1]
    print(f"dense perplexity {dense:.3f}")
    rows, ppl = [], {}
    for label, pattern, sparsity in SETTINGS:
        row = {"setting": label, "dense": dense}
        for method in TEXT_METHODS:
            if method.endswith("owl") and pattern != "unstructured":
                row[method] = row[method + " s"] = "-"  # OWL varies the sparsity per block: not for N:M
                continue
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            if method == "magnitude":
                magnitude(m, pattern, sparsity)
            else:
                ONESHOT[method](m, calibration, sparsity, pattern)
            seconds = time.perf_counter() - t0
            ppl[(label, method)] = row[method] = lm.evaluate(m, held)[1]
            row[method + " s"] = seconds
            print(f"{label:4s} {method:9s} perplexity {row[method]:.3f}  ({seconds:.1f} s)", flush=True)
        rows.append(row)
    inc = {k: ppl[k] - dense for k in ppl}
    owl_50 = {meth: inc[("50%", meth + "+owl")] / inc[("50%", "magnitude")] for meth in ("wanda", "sparsegpt")}
    bar_50 = {meth: inc[("50%", meth)] / inc[("50%", "magnitude")] for meth in METHODS[1:]}
    lines = [
        f"{ARCH_NAMES[args.arch]} byte LM (d_model {args.d_model}, {args.layers} blocks, context {args.seq}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), trained {args.steps} steps "
        f"(batch {args.batch}) on {corpus.source}" + (f" in {train_s:.0f} s" if train_s else " (cached)") + "; "
        f"held-out perplexity on {args.eval_windows} windows of {args.seq} bytes; 128 calibration sequences "
        "from the training split. Same layers pruned by every method (every linear layer of the blocks; "
        "embeddings and lm_head dense). Shared, loaded machine.", "",
        harness.table(rows, ["setting", "dense", *TEXT_METHODS]), "",
        "Seconds per pruning run:", "",
        harness.table(rows, ["setting"] + [m + " s" for m in TEXT_METHODS]), "",
        (f"At 50%: perplexity increase over dense, as a fraction of magnitude's: Wanda {bar_50['wanda']:.3f} "
         f"(per-layer comparison: {bar_50['wanda (layer)']:.3f}; OWL {owl_50['wanda']:.3f}), SparseGPT "
         f"{bar_50['sparsegpt']:.3f} (OWL {owl_50['sparsegpt']:.3f}) "
         f"(bar <= 0.333 each). At 2:4: SparseGPT {ppl[('2:4', 'sparsegpt')]:.3f} "
         f"vs Wanda {ppl[('2:4', 'wanda')]:.3f} (bar: SparseGPT <= Wanda)."),
    ]
    if args.plot:
        plot(rows, dense, args.plot, ARCH_NAMES[args.arch])
        lines += ["", f"Plot: `{os.path.relpath(args.plot, os.path.dirname(harness.RESULTS))}`."]
    body = "\n".join(lines)
    print(body)
    harness.append_results("bench_oneshot text: held-out perplexity after one-shot pruning", body)


def plot(rows, dense, path, arch="GPT-2-style"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(TEXT_METHODS)
    for i, method in enumerate(TEXT_METHODS):
        xs = [j + (i - (len(TEXT_METHODS) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[method] if r[method] != "-" else 0 for r in rows], width, label=method)
    ax.axhline(dense, color="k", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    ax.set_xticks(range(len(rows)), [r["setting"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"One-shot pruning of a {arch} byte LM trained on the stdlib's sources")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_recon(args):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.prune.test_oneshot import correlated_inputs  # the inputs of the test of the same bar

    torch.manual_seed(0)
    k, out = 512, 256
    layer = torch.nn.Linear(k, out, bias=False)
    x = correlated_inputs(8192, k)
    rows = []
    for label, pattern, sparsity in SETTINGS:
        row = {"setting": label}
        masks = {}
        for method in RECON_METHODS:
            model = torch.nn.Sequential(torch.nn.Linear(k, out, bias=False))
            model[0].weight.data.copy_(layer.weight)
            if method == "magnitude":
                magnitude(model, pattern, sparsity)
            else:
                ONESHOT[method](model, list(x.split(1024)), sparsity, pattern)
            masks[method] = model[0].weight_mask
            with torch.no_grad():
                row[method] = float((x @ layer.weight.T - model(x)).norm())
        row["bf16 H / fp32 H"] = row["sparsegpt (bf16 H)"] / row["sparsegpt"]
        row["bf16 H mask agreement"] = float((masks["sparsegpt"] == masks["sparsegpt (bf16 H)"]).float().mean())
        row["wanda / magnitude"] = row["wanda"] / row["magnitude"]
        row["wanda (layer) / magnitude"] = row["wanda (layer)"] / row["magnitude"]
        row["sparsegpt / magnitude"] = row["sparsegpt"] / row["magnitude"]
        rows.append(row)
    body = (f"One {out}×{k} layer, 8192 calibration tokens with features driven by 32 shared factors plus noise, "
            "log-normal scales (std 0.75): output error ||XWᵀ − XŴᵀ|| (bars at 50% and 2:4: SparseGPT <= 0.5x "
            "magnitude, Wanda <= 0.8x). 'sparsegpt (bf16 H)': hessian_dtype=torch.bfloat16; mask agreement: the "
            "fraction of entries whose keep/prune decision equals the float32 Hessian's.\n\n"
            + harness.table(rows, ["setting", *RECON_METHODS, "wanda / magnitude", "wanda (layer) / magnitude",
                                   "sparsegpt / magnitude", "bf16 H / fp32 H", "bf16 H mask agreement"]))
    print(body)
    harness.append_results("bench_oneshot recon: one-layer reconstruction error", body)


def run_speed(args):
    """One 4096×4096 Linear, 128 batches of 2048 tokens (8 distinct batches cycled: same work, less memory).

    Wanda runs whole (median of ``repeats``); SparseGPT's parts with each Hessian mode (float32, the default, bf16),
    the modes interleaved, medians of ``sg_repeats`` (the float32 Hessian alone costs 20-90 s here). Then the
    kernels side by side: the C++ column-block update against the torch loop on one 4096×128 block, and Wanda's
    k-th-value selection against a stable sort."""
    import statistics

    from nnopt import backends
    from nnopt.prune.oneshot import Stats
    from nnopt.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune
    from nnopt.prune.wanda import _keep_largest

    k = args.k
    torch.manual_seed(0)
    distinct = [torch.randn(args.tokens, k, dtype=args.dtype) for _ in range(8)]
    calibration = [distinct[i % 8] for i in range(args.batches)]
    base = torch.nn.Linear(k, k, bias=False).to(args.dtype)
    rows = []
    times = []
    for _ in range(args.repeats):
        model = torch.nn.Sequential(copy.deepcopy(base))
        t0 = time.perf_counter()
        prune.wanda(model, calibration, 0.5)
        times.append(time.perf_counter() - t0)
    rows.append({"method": "wanda", "part": "whole call (statistics + scores + selection)",
                 "seconds": statistics.median(times)})
    w = base.weight.detach().float()
    keeps, news, parts = {}, {}, {}
    for _ in range(args.sg_repeats):  # the modes interleaved, medians per part
        for hdt in args.hessian_dtypes:
            got = parts.setdefault(hdt, {"hessian": [], "factor": [], "prune": []})
            t0 = time.perf_counter()
            s = Stats("hessian", k, "cpu", hdt)
            for x in calibration:
                s.add(x)
            value = s.finish()
            got["hessian"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            upper, dead = inverse_hessian_factor(value, 0.01)
            got["factor"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            news[hdt], keeps[hdt] = sparsegpt_prune(w, upper, dead, "unstructured", 0.5, 128, backend="cpu")
            got["prune"].append(time.perf_counter() - t0)
            del value, upper
    for hdt, got in parts.items():
        label = f"sparsegpt, hessian_dtype={HDT_NAMES[hdt]}"
        totals = [sum(v) for v in zip(*got.values())]
        for part, name in (("hessian", "Hessian XᵀX (upper triangle)"),
                           ("factor", "damp + Cholesky + triangular inverse"),
                           ("prune", "mask selection + column-block updates (cpu kernel)")):
            rows.append({"method": label, "part": name, "seconds": statistics.median(got[part])})
        rows.append({"method": label, "part": "total", "seconds": statistics.median(totals)})
    compare = ""
    if torch.float32 in news:
        xe = distinct[0].float()
        err = {d: float((xe @ (w - news[d]).T).norm()) for d in news}
        compare = " Against the float32 Hessian on this layer (i.i.d. Gaussian inputs): " + "; ".join(
            f"{HDT_NAMES[d]}: mask agreement {float((keeps[d] == keeps[torch.float32]).float().mean()):.5f}, "
            f"output error on one batch {err[d] / err[torch.float32]:.5f}x" for d in news if d != torch.float32) + "."
    x = distinct[0].float()
    h = torch.zeros(k, k)
    gemm = harness.time_providers({"gemm": lambda: h.addmm_(x.T, x)}, "cpu", repeats=3, inner=1)["gemm"]
    # kernels against torch, side by side
    wb, a = torch.randn(k, 128), torch.randn(128, 128)
    ub = torch.linalg.cholesky(a @ a.T + 128 * torch.eye(128), upper=True).contiguous()
    pb = torch.rand(k, 128) < 0.5
    impls = {n: backends.implementation("oneshot", backends.resolve("oneshot", n)) for n in ("cpu", "torch")}

    def block(name):
        return lambda: impls[name].sparsegpt_block(wb.clone(), ub, pb.clone(), torch.empty_like(wb), 0, 0)

    blk = harness.time_providers({n: block(n) for n in impls}, "cpu", repeats=3, inner=1)
    score = w.abs()
    sel = harness.time_providers({
        "kthvalue": lambda: _keep_largest(score, k // 2),
        "stable sort": lambda: torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k // 2]},
        "cpu", repeats=3, inner=1)
    kernel_rows = [
        {"op": f"SparseGPT column-block update, one {k}×128 block", "nnopt": "cpu (C++)", "seconds": blk["cpu"],
         "torch loop s": blk["torch"], "speedup": blk["torch"] / blk["cpu"]},
        {"op": f"Wanda per-row selection, {k}×{k} at 50%", "nnopt": "kthvalue + tie pass (torch)",
         "seconds": sel["kthvalue"], "torch loop s": sel["stable sort"],
         "speedup": sel["stable sort"] / sel["kthvalue"]},
    ]
    body = (f"One {k}×{k} Linear ({args.dtype}), calibration {args.batches}×{args.tokens} tokens, 50% unstructured. "
            f"For scale: one {args.tokens}×{k} XᵀX GEMM (fp32) takes {gemm:.3f} s here, so a full Hessian costs "
            f"{args.batches}×that = {args.batches * gemm:.1f} s (nnopt computes its upper triangle: ~0.6x). "
            f"Shared machine (load average {os.getloadavg()[0]:.1f} on 2 cores), {torch.get_num_threads()} torch "
            f"threads; SparseGPT parts: medians of {args.sg_repeats}, modes interleaved; default Hessian here: "
            f"{'split (AMX)' if oneshot.split_hessian_available() else 'float32'}.{compare}\n\n"
            + harness.table(rows, ["method", "part", "seconds"]) + "\n\nKernels against torch's own ops "
            "(medians of 3, interleaved; the second row's baseline is a stable sort):\n\n"
            + harness.table(kernel_rows, ["op", "nnopt", "seconds", "torch loop s", "speedup"]))
    print(body)
    harness.append_results("bench_oneshot speed: one 4096×4096 layer", body)


def run_hessian(args):
    """Accuracy of each Hessian mode against the float64 XᵀX, and its effect on SparseGPT's decisions."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.prune.test_oneshot import correlated_inputs

    from nnopt.prune.oneshot import Stats
    from nnopt.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune

    k, batches, tokens, out = args.hk, args.hbatches, args.tokens, 512
    xs = [correlated_inputs(tokens, k, seed=i) for i in range(batches)]
    for x in xs:
        x[:, :8] *= 25  # a few large-magnitude channels, as LLM activations have
    exact = torch.zeros(k, k, dtype=torch.float64)
    for x in xs:
        exact.addmm_(x.double().T, x.double())
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(0))
    xe = torch.cat(xs[:4]).double()

    def prune_with(h):
        upper, dead = inverse_hessian_factor(h.double().clone(), 0.01)
        new, keep = sparsegpt_prune(w.double(), upper, dead, "unstructured", 0.5, 128)
        return keep, float((xe @ (w.double() - new).T).norm())

    ref_keep, ref_err = prune_with(exact)
    rows = []
    for hdt in (torch.float32, "split", torch.bfloat16):
        s = Stats("hessian", k, "cpu", hdt)
        for x in xs:
            s.add(x)
        h = s.finish().double()
        e = h - exact
        keep, err = prune_with(h)
        rows.append({"Hessian": HDT_NAMES[hdt], "rel. Frobenius error": f"{float(e.norm() / exact.norm()):.2e}",
                     "max-abs error / max abs": f"{float(e.abs().max() / exact.abs().max()):.2e}",
                     "max rel. error (diagonal)": f"{float((e.diagonal() / exact.diagonal()).abs().max()):.2e}",
                     "mask agreement vs float64 H": f"{float((keep == ref_keep).float().mean()):.6f}",
                     "output error / float64 H's": f"{err / ref_err:.6f}"})
    body = (f"Inputs: {batches} batches of {tokens} tokens × {k} features (32 shared factors plus noise, "
            "log-normal scales, 8 channels ×25 as LLM outlier features); errors of the float32 Hessian each mode "
            f"accumulates against float64 XᵀX; then SparseGPT (50%, a {out}×{k} weight, float64 pruning) from "
            "each Hessian: keep/prune decisions equal to those from the float64 Hessian, and the output error "
            "||X(W − Ŵ)ᵀ|| on 4 batches relative to the float64 Hessian's. AMX usable here: "
            f"{oneshot.split_hessian_available()} ('split' = the default; bfloat16 on AMX accumulates in "
            "float32 over each batch).\n\n" + harness.table(rows, list(rows[0])))
    print(body)
    harness.append_results("bench_oneshot hessian: accuracy of the Hessian modes", body)


def _memory_child(args):
    """Runs in a fresh process: peak RSS growth (VmHWM after resetting it) of one whole-model run."""
    from nnopt.demo import lm

    model = lm.build("gpt2", d_model=args.d_model, n_layers=args.layers, n_heads=8, seq_len=args.seq)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 256, (16, args.seq), generator=gen) for _ in range(8)]
    getattr(prune, args.method)(copy.deepcopy(model), calib[:1], 0.5, atomic=False)  # warm the allocator / imports
    import gc

    def peak_of(fn):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = harness.proc_status("VmRSS")
        fn()
        return harness.proc_status("VmHWM") - base

    with torch.no_grad():
        forward = peak_of(lambda: model(calib[0]))  # one batch's plain forward: its temporaries, measured
    peak = peak_of(lambda: getattr(prune, args.method)(model, calib, 0.5, atomic=args.atomic))
    d, ff, tokens = args.d_model, 4 * args.d_model, 128 * args.seq
    print(f"RESULT {peak} {tokens * d * 4} {ff * ff * 4} {forward}")


def run_memory(args):
    rows = []
    for method in ("wanda", "sparsegpt"):
        for atomic in (False, True):
            cmd = [sys.executable, __file__, "memory-child", "--method", method, "--d-model", str(args.d_model),
                   "--layers", str(args.layers), "--seq", str(args.seq)] + (["--atomic"] if atomic else [])
            cmd += ["--threads", str(args.threads)] if args.threads else []
            # A fixed mmap threshold: freed temporaries go back to the OS, so VmHWM measures live memory, not
            # glibc's heap growth under its dynamic threshold.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            peak, acts, k2, temps = map(int, out.split("RESULT")[1].split())
            mib = 1 << 20
            rows.append({"method": method, "atomic": atomic, "peak extra MiB": peak / mib,
                         "block inputs MiB": acts / mib, "2×K² fp32 MiB": 2 * k2 / mib,
                         "one batch's plain forward MiB": temps / mib,
                         "peak / (inputs + 2K²)": peak / (acts + 2 * k2),
                         "(peak − forward) / (inputs + 2K²)": (peak - temps) / (acts + 2 * k2)})
    body = (f"Whole-model run on a GPT-2 config (d_model {args.d_model}, {args.layers} blocks, d_ff "
            f"{4 * args.d_model}), 128 calibration sequences of {args.seq} tokens in 8 batches, 50% unstructured. "
            "Peak extra memory = VmHWM (reset via /proc/self/clear_refs) minus RSS before the call, in a fresh "
            "process with glibc's mmap threshold fixed at 64 KiB (freed buffers leave RSS). It includes the block "
            "forward's own temporaries for one batch, measured alone as the peak extra of one plain no_grad "
            "forward of one batch. atomic=True also keeps a copy of every original weight until the end.\n\n"
            + harness.table(rows, list(rows[0])))
    print(body)
    harness.append_results("bench_oneshot memory: peak extra memory of a whole-model run", body)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["text", "recon", "speed", "hessian", "memory", "memory-child"])
    p.add_argument("--hk", type=int, default=1024, help="hessian: features")
    p.add_argument("--hbatches", type=int, default=32, help="hessian: calibration batches")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="text: the LM's architecture")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bytes", type=int, default=6_000_000)
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--cache", default=None, help="save/load the trained LM here (skip training on reruns)")
    p.add_argument("--plot", default=None, help="a .png for the perplexity chart (text)")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batches", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sg-repeats", type=int, default=3, help="speed: SparseGPT runs per Hessian mode")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--hessian-dtype", default="all", choices=["float32", "bfloat16", "split", "default", "all"],
                   help="speed: SparseGPT's Hessian mode(s) to time (all: float32, default, bfloat16)")
    p.add_argument("--atomic", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a loaded machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype)
    modes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "split": "split", "default": None}
    args.hessian_dtypes = ((torch.float32, None, torch.bfloat16) if args.hessian_dtype == "all"
                           else (modes[args.hessian_dtype],))
    if args.plot and not args.plot.endswith(".png"):
        p.error("--plot must name a .png file")
    if args.part == "text":
        args.d_model = args.d_model or 128
        run_text(args)
    elif args.part == "recon":
        run_recon(args)
    elif args.part == "speed":
        run_speed(args)
    elif args.part == "hessian":
        run_hessian(args)
    else:
        args.d_model = args.d_model or 512
        (run_memory if args.part == "memory" else _memory_child)(args)


if __name__ == "__main__":
    main()
