"""The demo's outputs: the terminal summary, and a report folder (report.md, results.json, PNG plots)."""

import json
import os


def _table(head, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def tables(results):
    """{section title: text table} for the terminal and the Markdown report."""
    out = {}
    opt = results["optimizers"]
    out["1. Optimizers (nnopt fused vs torch.optim twin)"] = _table(
        ["optimizer", "implementation", "test acc", "final loss", "step ms"],
        [[r["optimizer"], r["impl"], f"{r['accuracy']:.3f}", f"{r['curve'][-1][1]:.3f}", f"{r['step_ms']:.3f}"]
         for r in opt])
    t = results["transfer"]
    out["2. Transfer"] = _table(
        ["model", "width", "test acc", "max |Δ output|"],
        [["copied from the teacher", "256", f"{t['accuracy']:.3f}", "0"],
         ["widened (Net2Net)", str(t["widened_to"]), f"{t['accuracy_widened']:.3f}", f"{t['widen_deviation']:.2e}"],
         ["narrowed (importance)", str(t["narrowed_to"]), f"{t['accuracy_narrowed']:.3f}",
          f"{t['narrow_deviation']:.2e}"]])
    p = results["prune"]
    rows = [[r["method"], f"{r['sparsity']:.3f}", f"{r['accuracy']:.3f}"] for r in p["rows"]]
    s = p["structured"]
    rows.append([f"structured 50% neurons + compact ({s['params_before']} → {s['params_after']} params)",
                 f"{1 - s['params_after'] / s['params_before']:.3f}", f"{s['accuracy_compacted']:.3f}"])
    out["3. Pruning (accuracy vs sparsity)"] = _table(["method", "sparsity", "test acc"], rows)
    d = results["distill"]
    out["4. Distillation into the 95%-sparse student"] = _table(
        ["model", "nonzero weights", "test acc"],
        [["dense teacher", str(d["teacher_params"]), f"{d['teacher']:.3f}"],
         ["student, fine-tuned on labels", str(d["student_nonzeros"]), f"{d['labels_only']:.3f}"],
         ["student, distilled (fused loss)", str(d["student_nonzeros"]), f"{d['distilled']:.3f}"]])
    sp = results["speed"]
    out[f"5. Inference speed (MLP width {sp['width']}, batch {sp['batch']}, {results['device']})"] = _table(
        ["model", "ms", "speedup vs dense"], [[r["model"], f"{r['ms']:.2f}", f"{r['speedup']:.2f}x"]
                                              for r in sp["rows"]])
    return out


def _plots(results, folder):
    """PNG plots when matplotlib is installed; returns their file names (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results["optimizers"]:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, label=f"{r['optimizer']} [{r['impl']}]", linestyle="-" if r["impl"] == "nnopt" else "--")
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves per optimizer", yscale="log")
    ax.legend(fontsize=7)
    files.append("loss_curves.png")
    fig.tight_layout(), fig.savefig(os.path.join(folder, files[-1]), dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method = {}
    for r in results["prune"]["rows"]:
        by_method.setdefault(r["method"], []).append((r["sparsity"], r["accuracy"]))
    for method, pts in by_method.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=method)
    ax.set(xlabel="sparsity", ylabel="test accuracy", title="Accuracy vs sparsity")
    ax.legend(fontsize=7)
    files.append("accuracy_vs_sparsity.png")
    fig.tight_layout(), fig.savefig(os.path.join(folder, files[-1]), dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = results["speed"]["rows"]
    ax.barh([r["model"] for r in rows], [r["speedup"] for r in rows])
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set(xlabel="speedup vs dense (higher is faster)", title=f"Inference speed ({results['device']})")
    files.append("speed.png")
    fig.tight_layout(), fig.savefig(os.path.join(folder, files[-1]), dpi=100), plt.close(fig)
    return files


def write(results, folder):
    """Writes report.md, results.json and the plots into ``folder``; returns the report's path."""
    os.makedirs(folder, exist_ok=True)
    plots = _plots(results, folder)
    lines = ["# nnopt demo report", "", f"Data: {results['data']}; device {results['device']}; "
             f"torch {results['torch']}; nnopt backend {results['backend']}; {results['seconds']:.0f} s.", ""]
    for title, table in tables(results).items():
        lines += [f"## {title}", "", "```", table, "```", ""]
    lines += ["## Transfer report", "", "```", results["transfer"]["report"], "```", ""]
    lines += [f"![{p[:-4]}]({p})" for p in plots] or ["(plots need matplotlib: pip install matplotlib)"]
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(dict(results, plots=plots), f, indent=1, default=str)
    return path
