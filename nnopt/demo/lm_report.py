"""The LM story's outputs: summary tables for the terminal, and its report folder (report.md, results.json, PNGs)."""

import json
import os

from nnopt.demo.report import _table


def _f(x, fmt=".2f"):
    return "-" if x is None else format(x, fmt)


def tables(results):
    """{section title: text table}."""
    out = {}
    out["1. Training the dense model (same seed, same batches)"] = _table(
        ["optimizer", "final loss", "held-out ppl", "step ms", "state bytes/param"],
        [[r["optimizer"], f"{r['curve'][-1][1]:.3f}", f"{r['perplexity']:.2f}", f"{r['step_ms']:.2f}",
          f"{r['state_bytes_per_param']:.2f}"] for r in results["train"]])
    if "grow" in results:
        g = results["grow"]
        out["2. Growth (function-preserving) vs training from scratch"] = _table(
            ["model", "params", "loss at start", "final loss", "held-out ppl"],
            [[r["model"], str(r["params"]), f"{r['curve'][0][1]:.3f}", f"{r['curve'][-1][1]:.3f}",
              f"{r['perplexity']:.2f}"] for r in g["rows"]])
    out["3. One-shot pruning (held-out perplexity)"] = _table(
        ["method", "pattern", "sparsity", "perplexity"],
        [[r["method"], r["pattern"], f"{r['sparsity']:.3f}", f"{r['perplexity']:.2f}"] for r in results["prune"]])
    r = results["recover"]
    out[f"4. Recovering the 90%-block model ({r['method']}, {r['steps']} steps)"] = _table(
        ["model", "perplexity"], [["one-shot, no training", f"{r['before']:.2f}"],
                                  ["fine-tuned on labels", f"{r['fine_tuned']:.2f}"],
                                  ["distilled from the dense teacher (fused loss)", f"{r['distilled']:.2f}"]])
    s = results["serve"]
    rows = []
    for r in s["rows"]:
        if "decode_tokens_per_s" in r:
            rows.append([r["model"], r["dtype"], f"decode B={r['batch']}", f"{r['decode_tokens_per_s']:.0f}",
                         _f(r.get("decode_speedup")) + ("x" if "decode_speedup" in r else "")])
        else:
            rows.append([r["model"], r["dtype"], f"prefill L={s['prefill_len']}", f"{r['prefill_tokens_per_s']:.0f}",
                         _f(r.get("prefill_speedup")) + ("x" if "prefill_speedup" in r else "")])
    out[f"5. Serving: dense vs 90%-block MaskedLinear ({results['device']})"] = _table(
        ["model", "dtype", "phase", "tokens/s", "speedup"], rows)
    return out


def _plots(results, folder):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []

    def save(fig, name):
        files.append(name)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results["train"]:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, label=r["optimizer"])
    for r in results.get("grow", {}).get("rows", []):
        xs, ys = zip(*r["curve"])
        off = results["train"][0]["curve"][-1][0] + 1 if r["model"].startswith("grown") else 0
        ax.plot([x + off for x in xs], ys, linestyle="--", label=r["model"])
    for name, curve in results["recover"]["curves"].items():
        xs, ys = zip(*curve)
        ax.plot(xs, ys, linestyle=":", label=f"90% blocks: {name.replace('_', '-')}")
    ax.set(xlabel="step", ylabel="training loss (nats/byte)", title="Loss curves")
    ax.legend(fontsize=7)
    save(fig, "lm_loss_curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r["perplexity"] for r in results["prune"] if r["method"] == "dense")
    by_method = {}
    for r in results["prune"]:
        if r["method"] != "dense":
            by_method.setdefault(r["method"], []).append((r["pattern"], r["perplexity"]))
    patterns = list(dict.fromkeys(p for pts in by_method.values() for p, _ in pts))
    width = 0.8 / max(1, len(by_method))
    for k, (method, pts) in enumerate(by_method.items()):
        d = dict(pts)
        ax.bar([i + k * width for i in range(len(patterns))], [d.get(p, 0) for p in patterns], width, label=method)
    ax.axhline(dense, color="k", linewidth=0.8, label="dense")
    ax.set_xticks([i + width * (len(by_method) - 1) / 2 for i in range(len(patterns))], patterns)
    ax.set(ylabel="held-out perplexity (log)", yscale="log", title="Perplexity by method and sparsity")
    ax.legend(fontsize=7)
    save(fig, "lm_perplexity.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in results["serve"]["rows"] if r["model"] == "sparse"]
    labels = [f"{r['dtype']} " + (f"decode B={r['batch']}" if "decode_speedup" in r else "prefill") for r in rows]
    vals = [r.get("decode_speedup", r.get("prefill_speedup", 0)) for r in rows]
    ax.barh(labels, vals)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set(xlabel="tokens/s vs dense (higher is faster)", title=f"90%-block MaskedLinear ({results['device']})")
    save(fig, "lm_tokens_per_s.png")
    return files


def write(results, folder):
    """Writes report.md, results.json and the plots into ``folder``; returns the report's path."""
    os.makedirs(folder, exist_ok=True)
    plots = _plots(results, folder)
    m = results["model"]
    lines = ["# nnopt demo lm report", "",
             f"Model: {results['model_source']}, {results['params']:,} parameters (d_model {m['d_model']}, "
             f"{m['n_layers']} layers, {m['n_heads']} heads / {m['n_kv_heads']} key-value heads, MLP {m['d_ff']}, "
             f"context {m['seq_len']} bytes). Text: {results['text']} ({results['train_bytes']:,} training / "
             f"{results['heldout_bytes']:,} held-out bytes). Device {results['device']}; torch {results['torch']}; "
             f"{results['seconds']:.0f} s.", ""]
    for title, table in tables(results).items():
        lines += [f"## {title}", "", "```", table, "```", ""]
    lines += ["## Samples (greedy prompt `def `, top-k 20 sampling)", ""]
    for name, text in results["serve"]["samples"].items():
        lines += [f"{name}:", "", "```", text, "```", ""]
    lines += [f"![{p[:-4]}]({p})" for p in plots] or ["(plots need matplotlib: pip install matplotlib)"]
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(dict(results, plots=plots), f, indent=1, default=str)
    return path
