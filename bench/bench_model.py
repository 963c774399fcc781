"""Whole-model benchmark: block-sparse transformers (nnopt.nn.convert) against the same pruned model run dense.

Models (transformers configs, random init, no download; nnopt.demo.lm): ``llama`` (hidden 1024, intermediate 4096,
16 heads, RMSNorm, SiLU-gated MLP, nn.Linear projections) and ``gpt2`` (n_embd 1024, n_inner 4096, 16 heads,
Conv1D projections), 2 layers, the byte vocabulary (256). Every projection of the blocks is pruned (lm_head and
embeddings stay dense) to ``50%`` or ``90%`` of its 32×32 tiles (kept tiles chosen at random, entirely kept) or to
``2:4`` (two of every four input features, every tile partly kept); masks under nnopt.prune's contract
(custom_from_mask). ``dense`` is that pruned model as it is (zeros in dense weights); ``nnopt`` is a deep copy
converted with nnopt.nn.convert (auto backend, which picks per layer and call).

Measured, fp32 and bf16 (the model cast), every case checked first (nnopt's logits against dense's):
  decode    tokens/s of greedy decoding with a KV cache (a hand loop of one-token forwards on a DynamicCache,
            after a 16-token prompt), B = 1 and B = 8 sequences
  prefill   tokens/s of one forward over B × L prompt tokens (B = 1 and 8, L = 64), no cache
Speedup = nnopt tokens/s ÷ dense tokens/s, medians of interleaved repeats, same run.

    python bench/bench_model.py [--quick] [--models llama,gpt2] [--dtypes fp32,bf16] [--repeats N]
                                [--threads N] [--plot FILE.png] [--no-append]
"""

import argparse
import copy
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from nnopt import layers  # noqa: E402
from nnopt.prune import methods  # noqa: E402

PRUNINGS = ("50% blocks", "90% blocks", "2:4")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Bars on the Llama-style model at 90% blocks (nnopt ÷ dense tokens/s).
BARS = {("llama", "90% blocks", "fp32", "decode B=1"): 3.0, ("llama", "90% blocks", "fp32", "decode B=8"): 3.0,
        ("llama", "90% blocks", "bf16", "decode B=1"): 2.5, ("llama", "90% blocks", "bf16", "decode B=8"): 2.5,
        ("llama", "90% blocks", "fp32", "prefill B=1 L=64"): 3.5}


def build(kind, quick):
    from nnopt.demo import lm

    d, ff = (256, 1024) if quick else (1024, 4096)
    return lm.build(kind, d_model=d, n_layers=2, n_heads=d // 64, d_ff=ff, seq_len=128, seed=0)


def prune_mask(module, pruning, seed):
    """The mask of one projection, in its weight's storage shape (Conv1D: [in, out])."""
    n_in, n_out = layers.in_out_features(module)
    gen = torch.Generator().manual_seed(seed)
    if pruning == "2:4":
        keep = torch.rand(n_out, n_in // 4, 4, generator=gen).argsort(-1).argsort(-1) < 2
        mask = keep.reshape(n_out, n_in)
    else:
        sparsity = float(pruning.split("%")[0]) / 100
        nb, kb = -(-n_out // 32), -(-n_in // 32)
        tiles = torch.zeros(nb * kb, dtype=torch.bool)
        tiles[torch.randperm(nb * kb, generator=gen)[:round((1 - sparsity) * nb * kb)]] = True
        mask = tiles.view(nb, kb).repeat_interleave(32, 0).repeat_interleave(32, 1)[:n_out, :n_in]
    return (mask.t() if layers.is_conv1d(module) else mask).contiguous()


def pruned(kind, pruning, quick):
    model = build(kind, quick)
    for i, (name, module) in enumerate(layers.linear_modules(model)):
        if name != "lm_head":
            methods.custom_from_mask(module, "weight", prune_mask(module, pruning, i))
    return model.eval()


def _forward(model, ids, cache):
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(ids, use_cache=True, **{name: cache})


def decoder(model, batch, prompt=16, steps=16):
    """A function running greedy decoding: a prompt forward, then ``steps`` one-token forwards (timed part)."""
    import transformers

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen)

    def setup():
        cache = transformers.DynamicCache()
        out = _forward(model, ids, cache)
        return cache, out.logits[:, -1:].argmax(-1)

    def run(state):
        cache, token = state
        for _ in range(steps):
            token = _forward(model, token, cache).logits[:, -1:].argmax(-1)
        return token

    return setup, run, batch * steps


def time_pair(fns, repeats):
    """{name: median seconds} of fns = {name: (setup, run)}, interleaved; setup (the prompt) is not timed."""
    import statistics
    import time

    samples = {n: [] for n in fns}
    for n, (setup, run) in fns.items():  # warm-up: packing, layouts, the auto probe
        run(setup())
    for _ in range(repeats):
        for n, (setup, run) in fns.items():
            state = setup()
            t0 = time.perf_counter()
            run(state)
            samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}


def check(dense, sparse, dtype):
    ids = torch.randint(0, dense.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    a, b = dense(ids).logits.float(), sparse(ids).logits.float()
    err = float((a - b).abs().max() / a.abs().max())
    limit = 1e-4 if dtype == torch.float32 else 5e-2
    if err > limit:
        raise AssertionError(f"nnopt logits differ from dense by {err:.2e} (relative), limit {limit:g}")
    return err


def run(device="cpu", quick=False, models=("llama", "gpt2"), dtypes=("fp32", "bf16"), prunings=PRUNINGS,
        repeats=None, threads=None, plot_path=None, append=True):
    import nnopt.nn as nnn

    if device != "cpu":
        raise ValueError("bench_model measures CPU inference (the decode kernels of this issue); use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    repeats = repeats or (3 if quick else 7)
    if quick:
        prunings = tuple(p for p in prunings if p == "90% blocks") or prunings[:1]
    print(f"bench_model: {harness.machine()}", flush=True)
    rows = []
    for kind in models:
        for pruning in prunings:
            base = pruned(kind, pruning, quick)
            for dt in dtypes:
                dtype = DTYPES[dt]
                dense = copy.deepcopy(base).to(dtype)
                sparse = nnn.convert(copy.deepcopy(base).to(dtype), exclude=["lm_head"])
                with torch.no_grad():
                    err = check(dense, sparse, dtype)
                    cases = []
                    for b in (1, 8):
                        cases.append((f"decode B={b}", {n: decoder(m, b, steps=4 if quick else 16)
                                                        for n, m in (("dense", dense), ("nnopt", sparse))}))
                    for b in (1, 8):
                        ids = torch.randint(0, 256, (b, 64), generator=torch.Generator().manual_seed(2))
                        cases.append((f"prefill B={b} L=64", {
                            n: (lambda: None, lambda _s, m=m, ids=ids: m(ids, use_cache=False), ids.numel())
                            for n, m in (("dense", dense), ("nnopt", sparse))}))
                    for case, fns in cases:
                        tokens = fns["dense"][2]
                        t = time_pair({n: f[:2] for n, f in fns.items()}, repeats)
                        row = {"model": kind, "pruning": pruning, "dtype": dt, "case": case,
                               "dense tok/s": tokens / t["dense"], "nnopt tok/s": tokens / t["nnopt"],
                               "speedup": t["dense"] / t["nnopt"], "logits err": f"{err:.1e}"}
                        rows.append(row)
                        print(f"  {kind:5s} {pruning:10s} {dt} {case:17s} dense {row['dense tok/s']:8.1f} tok/s  "
                              f"nnopt {row['nnopt tok/s']:8.1f} tok/s  {row['speedup']:.2f}x", flush=True)
    text = ("Llama-/GPT-2-style models (hidden 1024, intermediate 4096, 2 layers, 16 heads, vocab 256; random init) "
            f"{'(quick: hidden 256) ' if quick else ''}with every block projection pruned (lm_head dense); dense = "
            "the pruned model as it is, nnopt = nnopt.nn.convert of it (auto). Decode: greedy one-token steps on a "
            "KV cache after a 16-token prompt; prefill: one forward over B × 64 tokens.\n\n"
            + harness.table([dict(r, speedup=f"{r['speedup']:.2f}x") for r in rows],
                            ["model", "pruning", "dtype", "case", "dense tok/s", "nnopt tok/s", "speedup",
                             "logits err"]))
    lines = []
    for (kind, pruning, dt, case), bar in BARS.items():
        for r in rows:
            if (r["model"], r["pruning"], r["dtype"], r["case"]) == (kind, pruning, dt, case):
                verdict = "met" if r["speedup"] >= bar else "missed"
                lines.append(f"- {kind} {pruning} {dt} {case}: {r['speedup']:.2f}x (bar {bar:g}x: {verdict})")
    if lines and not quick:
        text += "\n\nBars (nnopt ÷ dense tokens/s):\n\n" + "\n".join(lines)
    print("\n" + text)
    if plot_path:
        plot(rows, plot_path)
        print(f"plot: {plot_path}")
    if append:
        harness.append_results(f"bench_model (cpu{', quick' if quick else ''})", text)
    return [dict(model=r["model"], pruning=r["pruning"], dtype=r["dtype"], case=r["case"],
                 speedup_vs_dense=r["speedup"]) for r in rows]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows})
    groups = [(m, p, d) for m in dict.fromkeys(r["model"] for r in rows) for p in dict.fromkeys(r["pruning"]
              for r in rows) for d in dict.fromkeys(r["dtype"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.9), 4))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        vals = [next((r["speedup"] for r in rows if (r["model"], r["pruning"], r["dtype"], r["case"]) == g + (case,)),
                     0.0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=case)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([" ".join(g) for g in groups], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s vs dense")
    ax.set_title("nnopt sparse transformers vs dense (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 256, 90%% blocks only: a minute or two")
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--prunings", default=",".join(PRUNINGS))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot", default=None, help="write a PNG of the speedups")
    ap.add_argument("--no-append", dest="no_append", action="store_true", help="do not append to bench/RESULTS.md")
    a = ap.parse_args(argv)
    run("cpu", a.quick, tuple(a.models.split(",")), tuple(a.dtypes.split(",")), tuple(a.prunings.split(",")),
        a.repeats, a.threads, a.plot, not a.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
