"""``nnopt bench``: runs the microbenchmarks of the source tree's ``bench/`` folder and gathers their rows.

Each benchmark validates every provider's output against the reference before timing it, times providers
interleaved (medians), and reports ratios against every torch mode and the floor measured in the same run.
``--json`` writes the rows, ``--plot`` a PNG of the speedups (and the masked-linear break-even curve).
"""

import importlib.util
import json
import os
import sys

# name -> (bench file, function(module, device, quick) -> rows: list of dicts)
BENCHES = {
    "optim": ("bench_optim.py", lambda m, device, quick: [
        dict(model=r[0], optimizer=r[1], provider=r[2], x_floor=r[3], x_inplace_floor=r[4], speedup_vs_fused=r[5],
             speedup_vs_best_torch=r[6]) for r in m.run(device, quick=quick, record=False)]),
    "masked-linear": ("bench_masked_linear.py", lambda m, device, quick: m.run(device=device, quick=quick,
                                                                               append=False)),
    "prune": ("bench_prune.py", lambda m, device, quick: m.run(quick=quick, runs=1 if quick else 3, record=False)),
    "compact": ("bench_compact.py", lambda m, device, quick: m.run(device, quick=quick, record=False)),
    "distill": ("bench_distill.py", lambda m, device, quick: m.run(device, quick=quick, append=False)),
    "model": ("bench_model.py", lambda m, device, quick: m.run("cpu", quick=quick, append=False)),
}
# Run only when named: whole transformers models (the optional dependency), minutes even with --quick.
NOT_IN_ALL = {"model"}


def bench_dir():
    """The source tree's bench/ folder (nnopt bench needs a checkout: the benchmarks are not packaged)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "bench")
    if not os.path.isfile(os.path.join(path, "harness.py")):
        raise FileNotFoundError(f"nnopt bench needs the source tree's bench/ folder (looked in {path})")
    return path


def _load(filename):
    folder = bench_dir()
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the benchmarks import their harness as a sibling module
    spec = importlib.util.spec_from_file_location(f"nnopt_bench_{filename[:-3]}", os.path.join(folder, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _speedups(rows):
    """(label, speedup) pairs for the plot: the first numeric column whose name says 'speedup'."""
    out = []
    for r in rows:
        if "block" in r:  # a break-even point: drawn as a curve
            continue
        key = next((k for k in r if "speedup" in k and isinstance(r[k], (int, float))), None)
        if key is not None:
            parts = [f"{v:g}" if isinstance(v, float) and k == "sparsity" else str(v) for k, v in r.items()
                     if k == "sparsity" or isinstance(v, str)]
            out.append((" ".join(parts)[:60], float(r[key])))
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, _speedups(rows)) for name, rows in results.items()]
    panels = [(n, s) for n, s in panels if s]
    curve = [r for r in results.get("masked-linear", []) if "sparsity" in r and "block" in r]
    n = len(panels) + (1 if curve else 0)
    if n == 0:
        raise ValueError("--plot: the chosen benchmarks produced no speedup to plot")
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n), squeeze=False)
    for ax, (name, pairs) in zip(axes[:, 0], panels):
        ax.barh([p[0] for p in pairs], [p[1] for p in pairs])
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.set_title(f"{name}: speedup (higher is faster)")
        ax.tick_params(axis="y", labelsize=6)
    if curve:
        ax = axes[-1, 0]
        for block in sorted({r["block"] for r in curve}, key=str):
            pts = sorted((r["sparsity"], r["speedup"]) for r in curve if r["block"] == block)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"block {block}")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set(xlabel="sparsity", ylabel="speedup vs dense", title="masked linear: break-even", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(which="all", device=None, quick=False, json_path=None, plot_path=None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    names = [n for n in BENCHES if n not in NOT_IN_ALL] if which == "all" else [which]
    for path in (json_path, plot_path):
        if path is not None:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise OSError(f"{path}: its folder {folder} is not a writable directory")
    if plot_path is not None:
        if not plot_path.lower().endswith(".png"):
            raise ValueError(f"--plot {plot_path}: give a .png file name")
        try:
            import matplotlib  # noqa: F401 - checked before hours of benchmarks, not after
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    results = {}
    for name in names:
        filename, call = BENCHES[name]
        print(f"== nnopt bench {name} ({device}{', quick' if quick else ''})", flush=True)
        results[name] = call(_load(filename), device, quick)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=device, quick=quick, results=results), f, indent=1, default=str)
        print(f"json: {json_path}")
    if plot_path:
        plot(results, plot_path)
        print(f"plot: {plot_path}")
    return 0
