"""``nnopt demo``: the whole story on one dataset — train, transfer, prune, distil, measure inference speed.

Scikit-learn's bundled digits by default (no download), or ``--data PATH`` (.npz or IDX files such as MNIST).
Prints progress and a summary table, and writes a report folder (report.md, results.json, PNG plots).
"""

import os
import time

import torch

from nnopt import backends


def run(quick=False, device=None, data=None, out="nnopt-report", backend="auto", steps=None, progress=True):
    from nnopt.demo import data as data_mod
    from nnopt.demo import report, stages

    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be a positive number of training steps, got {steps}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if backend != "auto":
        why = backends.missing(backend, device) if backend in backends.BACKENDS else f"unknown backend {backend!r}"
        if why is not None:
            raise ValueError(f"--backend {backend}: {why}")
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise OSError(f"--out {out}: not a writable folder ({e.strerror or e})") from None
    loaded = data_mod.load(data, device)
    train_data, name = loaded[:4], loaded[4]
    cfg = dict(device=device, quick=quick, backend=backend, progress=progress,
               steps=steps or (150 if quick else 600))
    start = time.perf_counter()
    print(f"nnopt demo: {name} ({len(train_data[0])} train / {len(train_data[2])} test), device {device}, "
          f"{cfg['steps']} steps per run{' (quick)' if quick else ''}")
    results = dict(data=name, device=device, torch=torch.__version__, backend=backend)
    print("\n[1/5] optimizers")
    results["optimizers"], teacher = stages.optimizers(train_data, cfg)
    print("[2/5] transfer")
    results["transfer"] = stages.transfer(teacher, train_data, cfg)
    print(results["transfer"]["report"])
    print("[3/5] pruning")
    rows, structured, sparse95 = stages.pruning(teacher, train_data, cfg)
    results["prune"] = dict(rows=rows, structured=structured)
    print("[4/5] distillation")
    results["distill"] = stages.distill(teacher, sparse95, train_data, cfg)
    print("[5/5] inference speed")
    results["speed"] = stages.speed(cfg)
    results["seconds"] = time.perf_counter() - start
    print()
    for title, table in report.tables(results).items():
        print(f"{title}\n{table}\n")
    path = report.write(results, out)
    print(f"report: {path}")
    return 0
