"""Growing and shrinking transformer blocks (nnopt.transfer.grow) on byte-level language models from
``transformers`` configs, trained on the standard library's Python sources (nnopt.demo.text, held-out split).

1. Function preservation (random init, fp32, eval): the relative change of the logits (max |diff| / max |logit|)
   after ``widen_mlp`` (x2), ``add_heads`` (+50%), ``insert_block`` (middle) and ``widen_hidden`` (x2) on GPT-2,
   BERT and Llama (GQA).
2. Growth then training, per architecture (GPT-2, Llama) and seed: a small model (``--d`` wide, 2 blocks) is
   trained ``--pretrain`` steps; it is grown (MLP x2, heads x2, 2 -> 4 blocks); the grown model and a model of the
   same architecture initialised from scratch (transformers' own init) both train ``--steps`` steps on the same
   batches (and the scratch model then trains on for ``--pretrain`` more steps, as a compute reference). Bars: the
   grown model's held-out loss before training equals the small model's (within 1%); it ends below the scratch
   model.
3. Shrinking by importance at 25% (the trained small models): ``remove_heads`` (GPT-2 1 of 4 per block, Llama 2
   of 8: one per kv group) and
   ``narrow_mlp`` (25% of the units) by importance ("taylor" on 4 training batches, and the data-free
   "magnitude") vs at random (the mean of three random draws); held-out loss increase. Bar: importance <= random,
   averaged over the seeds.

    python bench/bench_grow.py [--seeds 3] [--pretrain 200] [--steps 100] [--quick] [--no-record]
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness

from nnopt.demo import lm, text
from nnopt.transfer import add_heads, insert_block, narrow_mlp, remove_heads, widen_hidden, widen_mlp

FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "grow.png")


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def tiny(kind, seed):
    t = _transformers()
    if kind == "bert":
        cfg = t.BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=64)
        torch.manual_seed(seed)
        return t.BertForMaskedLM(cfg).eval()
    return lm.build(kind, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2 if kind == "llama" else None,
                    seq_len=64, seed=seed).eval()


def preservation(seeds):
    rows = []
    x = {"input_ids": torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))}
    ops = {"widen_mlp x2": lambda m: widen_mlp(m, 1024, probe=x),
           "add_heads +2": lambda m: add_heads(m, 2, probe=x),
           "insert_block @2": lambda m: insert_block(m, 2, probe=x),
           "widen_hidden x2": lambda m: widen_hidden(m, 256, probe=x)}
    for kind in ("gpt2", "bert", "llama"):
        for name, op in ops.items():
            worst = 0.0
            for seed in range(seeds):
                model = tiny(kind, seed)
                new, report = op(model)
                with torch.no_grad():
                    a, b = model(**x).logits, new(**x).logits
                rel = float((a - b).abs().max() / a.abs().max())
                worst = max(worst, rel, report.relative_deviation)
            rows.append({"model": kind, "operation": name, "max relative logit change": f"{worst:.2e}",
                         "bar 1e-5": "met" if worst <= 1e-5 else "NOT met"})
            print(rows[-1], flush=True)
    return rows


def grow(model, kind):
    d_ff = model.config.intermediate_size if kind == "llama" else model.config.n_inner
    heads = model.config.num_attention_heads
    model, _ = widen_mlp(model, 2 * d_ff)
    model, _ = add_heads(model, heads)
    model, _ = insert_block(model, 1)
    model, _ = insert_block(model, 3)
    return model


def scratch_like(model, seed):
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    fresh.apply(fresh._init_weights)
    return fresh


def opt(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def params(model):
    return sum(p.numel() for p in model.parameters())


def growth(corpus, heldout, kinds, seeds, args):
    rows, curves, trained = [], {}, {}
    for kind in kinds:
        for seed in range(seeds):
            t0 = time.perf_counter()
            small = lm.build(kind, d_model=args.d, n_layers=2, n_heads=4 if kind == "gpt2" else 8,
                             n_kv_heads=2 if kind == "llama" else None, d_ff=2 * args.d, seq_len=args.seq, seed=seed)
            lm.train(small, corpus, opt(small, args.lr), args.pretrain, args.batch, args.seq, seed=1000 + seed)
            small_loss = lm.evaluate(small, heldout)[0]
            trained[(kind, seed)] = small
            big = grow(small, kind)
            start = lm.evaluate(big, heldout)[0]
            scratch = scratch_like(big, seed)
            g_curve = lm.train(big, corpus, opt(big, args.lr), args.steps, args.batch, args.seq, seed=2000 + seed)
            s_curve = lm.train(scratch, corpus, opt(scratch, args.lr), args.steps, args.batch, args.seq,
                               seed=2000 + seed)
            g_end, s_end = lm.evaluate(big, heldout)[0], lm.evaluate(scratch, heldout)[0]
            # the same architecture from scratch for as many steps as the small model and the grown one together
            lm.train(scratch, corpus, opt(scratch, args.lr), args.pretrain, args.batch, args.seq, seed=3000 + seed)
            s_long = lm.evaluate(scratch, heldout)[0]
            curves.setdefault(kind, []).append((g_curve, s_curve, small_loss))
            rows.append({"model": kind, "seed": seed, "params small -> grown": f"{params(small):,} -> {params(big):,}",
                         "small held-out": small_loss, "grown at step 0": start,
                         "start gap": f"{abs(start - small_loss) / small_loss:.1e}",
                         f"grown after {args.steps}": g_end, f"scratch after {args.steps}": s_end,
                         "grown < scratch": "yes" if g_end < s_end else "NO",
                         f"scratch after {args.steps + args.pretrain}": s_long})
            print(rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows, curves, trained


def shrinking(trained, heldout, corpus, args):
    rows = []
    gen = torch.Generator().manual_seed(7)
    calib = []
    for _ in range(4):  # calibration batches for the Taylor importance: training text, never the held-out part
        ids = corpus.batch("train", args.batch, args.seq, gen)
        calib.append({"input_ids": ids, "labels": ids})
    ops = {"remove_heads 1/4": lambda m, imp, g: remove_heads(m, 1, importance=imp, generator=g, data=calib)[0],
           "narrow_mlp 25%": lambda m, imp, g: narrow_mlp(m, int(0.75 * 2 * args.d), importance=imp, generator=g,
                                                          data=calib)[0]}
    for (kind, seed), model in trained.items():
        base = lm.evaluate(model, heldout)[0]
        for name, op in ops.items():
            if kind == "llama" and name.startswith("remove_heads"):
                # GQA, 8 query heads in 2 kv groups: 25% is one head from each group
                op = (lambda m, imp, g: remove_heads(m, 2, importance=imp, generator=g, data=calib)[0])
                label = "remove_heads 2/8 (GQA)"
            else:
                label = name
            mag = lm.evaluate(op(model, "magnitude", None), heldout)[0] - base
            tay = lm.evaluate(op(model, "taylor", None), heldout)[0] - base
            rand = statistics.mean(lm.evaluate(op(model, "random", torch.Generator().manual_seed(r)), heldout)[0] - base
                                   for r in range(3))
            rows.append({"model": kind, "seed": seed, "operation": label, "base held-out": base,
                         "increase, taylor": tay, "increase, magnitude": mag, "increase, random (mean of 3)": rand})
            print(rows[-1], flush=True)
    return rows


def plot(curves, args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(os.path.dirname(FIGURE), exist_ok=True)
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (kind, runs) in zip(axes[0], curves.items()):
        for i, (g, s, small) in enumerate(runs):
            ax.plot(g, color="C0", alpha=0.8, label="grown (from the trained small model)" if i == 0 else None)
            ax.plot(s, color="C1", alpha=0.8, label="same architecture from scratch" if i == 0 else None)
            ax.axhline(small, color="C2", ls="--", lw=0.8, label="small model, held-out" if i == 0 else None)
        ax.set_title(f"{kind}: training loss after growth ({len(runs)} seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/byte)")
        ax.set_ylim(top=min(max(max(s[:5]) for _, s, _ in runs), 6.0))
        ax.legend()
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=90)
    plt.close(fig)
    return os.path.relpath(FIGURE, os.path.dirname(harness.RESULTS))


def summary(growth_rows, shrink_rows, args):
    lines = []
    gaps = [abs(r["grown at step 0"] - r["small held-out"]) / r["small held-out"] for r in growth_rows]
    lines.append(f"- grown model starts at the small model's held-out loss: worst gap {max(gaps):.1e} (bar 1%: "
                 f"{'met' if max(gaps) <= 0.01 else 'NOT met'})")
    for kind in sorted({r["model"] for r in growth_rows}):
        rs = [r for r in growth_rows if r["model"] == kind]
        g = statistics.mean(r[f"grown after {args.steps}"] for r in rs)
        s = statistics.mean(r[f"scratch after {args.steps}"] for r in rs)
        wins = sum(r["grown < scratch"] == "yes" for r in rs)
        long = statistics.mean(r[f"scratch after {args.steps + args.pretrain}"] for r in rs)
        lines.append(f"- {kind}: after {args.steps} steps grown {g:.3f} vs scratch {s:.3f} nats/byte held-out "
                     f"(mean of {len(rs)} seeds; grown lower in {wins}/{len(rs)}) (bar: "
                     f"{'met' if wins == len(rs) else 'NOT met'}); scratch after {args.steps + args.pretrain} steps: "
                     f"{long:.3f}")
    for kind, op in sorted({(r["model"], r["operation"]) for r in shrink_rows}):
        rs = [r for r in shrink_rows if r["model"] == kind and r["operation"] == op]
        tay = statistics.mean(r["increase, taylor"] for r in rs)
        mag = statistics.mean(r["increase, magnitude"] for r in rs)
        rand = statistics.mean(r["increase, random (mean of 3)"] for r in rs)
        lines.append(f"- {kind} {op}: held-out loss increase by taylor importance {tay:.4f} vs random {rand:.4f} "
                     f"(magnitude {mag:.4f}; mean of {len(rs)} seeds) (bar, taylor: "
                     f"{'met' if tay <= rand else 'NOT met'}; magnitude: {'met' if mag <= rand else 'NOT met'})")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pretrain", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 20 pretraining and 10 training steps")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.pretrain, args.steps = 1, 20, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    _transformers()
    start = time.perf_counter()
    corpus = text.corpus(max_bytes=2_000_000)
    heldout = corpus.windows("heldout", args.seq, 64)
    pres = preservation(args.seeds)
    growth_rows, curves, trained = growth(corpus, heldout, ("gpt2", "llama"), args.seeds, args)
    shrink_rows = shrinking(trained, heldout, corpus, args)
    figure = plot(curves, args)
    text_summary = summary(growth_rows, shrink_rows, args)
    print(text_summary)
    elapsed = time.perf_counter() - start
    if args.no_record:
        return
    body = [
        f"Byte-level LMs on {corpus.source} ({corpus.train.numel():,} training bytes; held-out loss on 64 windows "
        f"of {args.seq} bytes). Small models: d={args.d}, 2 blocks, GPT-2 4 heads, Llama 8 heads in 2 kv groups, MLP "
        f"{2 * args.d}; "
        f"trained {args.pretrain} steps (AdamW lr {args.lr}, batch {args.batch}). Grown: widen_mlp x2, add_heads "
        f"x2, insert_block at 1 and 3 (2 -> 4 blocks). {torch.get_num_threads()} torch thread(s). Shared machine "
        f"(other engineers' builds and tests running); whole run {elapsed:.0f}s.",
        "", "Function preservation (random init, fp32, eval; d=128, 4 blocks, 4 heads, seq 64; worst over "
        f"{args.seeds} seeds):", "", harness.table(pres, list(pres[0])),
        "", f"Growth then {args.steps} training steps (the grown model and a same-architecture model from "
        "transformers' init see the same batches; the last column trains that scratch model on for as many steps as "
        "the small model had, a fresh AdamW at the same learning rate, no warmup):", "",
        harness.table(growth_rows, list(growth_rows[0])),
        "", "Shrinking the trained small models by importance vs at random (taylor: 4 calibration batches of "
        "training text):", "",
        harness.table(shrink_rows, list(shrink_rows[0])), "", "Bars:", "", text_summary]
    if figure:
        body += ["", f"![training after growth]({figure})"]
    harness.append_results("bench_grow (cpu): growing and shrinking transformer blocks", "\n".join(body))


if __name__ == "__main__":
    main()
