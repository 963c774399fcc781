"""The digits story of ``nnopt demo``: an MLP on scikit-learn's bundled digits (or ``--data``) trained with nnopt's
fused optimizers beside torch's, transferred, pruned, distilled and timed (the stages are in ``stages.py``)."""

import time

import torch


def run(quick, device, data, out, backend, steps, progress):
    """Runs the five stages and writes the report into ``out`` (checked writable); returns the report's path."""
    from nnopt.demo import data as data_mod
    from nnopt.demo import report, stages

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
    return path
