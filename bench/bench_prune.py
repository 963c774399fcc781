"""Global magnitude pruning benchmark: time and peak extra memory of torch.nn.utils.prune.global_unstructured
(L1, 90%) against nnopt's exact radix select, on a 101M-parameter MLP (6 × Linear(4096, 4096), fp32, CPU).

Providers, each in its own subprocess (so one provider's allocations cannot hide another's peak):
  torch                 torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=0.9)
  nnopt.global          nnopt.prune.global_unstructured, same call (when nnopt/prune/global_.py exists)
  select+mask <b>       nnopt.prune._select.kth_smallest(weights, magnitude=True) on backend <b>, then a masking
                        pass writing each bool mask in slices (what a memory-light global_unstructured does)
  select <b>            the selection alone
Time: wall seconds of one call on a freshly built model (median over --runs subprocesses). Memory: the rise of
the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the model is built) over its RSS before
the call; the masks themselves (1 byte per weight, 96 MiB here) are part of every pruning provider's output.
Check: every provider prunes exactly k weights and its masks equal torch's off the weights tied with the threshold
(kaiming-uniform fp32 weights do have a few |w| equal to tau; torch and nnopt may prune different ones of those).

    python bench/bench_prune.py [--quick] [--runs N] [--no-record]
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness

AMOUNT = 0.9
SLICE = 1 << 20


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _digest(masks):
    import torch

    h = hashlib.sha1()
    for m in masks:
        h.update(m.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12], sum(int((~m).sum()) for m in masks)


def run_one(provider, layers, width):
    """Runs one provider once in this process; returns its JSON record."""
    import torch
    import torch.nn.utils.prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    weights = [m.weight for m in model]
    n = sum(w.numel() for w in weights)
    k = round(AMOUNT * n)
    if provider != "torch":  # imports and the extension load are not part of the call
        from nnopt import _ext

        _ext.load()

    def call(model, weights, k):
        pairs = [(m, "weight") for m in model]
        masks = []
        if provider == "torch":
            torch.nn.utils.prune.global_unstructured(pairs, torch.nn.utils.prune.L1Unstructured, amount=AMOUNT)
            masks = [m.weight_mask.bool() for m in model]
        elif provider == "nnopt.global":
            import nnopt.prune

            nnopt.prune.global_unstructured(pairs, torch.nn.utils.prune.L1Unstructured, amount=AMOUNT)
            masks = [m.weight_mask for m in model]
        else:
            from nnopt.prune._select import kth_smallest

            kind, backend = provider.split(" ")
            with torch.no_grad():
                tau, n_less = kth_smallest([w.detach() for w in weights], None, k, backend=backend, magnitude=True)
                masks = []
                if kind == "select+mask":
                    ties = k - n_less  # entries equal to tau to prune: the first ones, in order
                    for w in weights:
                        keep = torch.empty(w.shape, dtype=torch.bool)
                        wf, kf = w.detach().reshape(-1), keep.view(-1)
                        for s in range(0, wf.numel(), SLICE):
                            a = wf[s:s + SLICE].abs()
                            torch.gt(a, tau, out=kf[s:s + SLICE])
                            eq = (a == tau).nonzero().flatten()[ties:]  # tied entries beyond the quota stay
                            ties = max(0, ties - int((a == tau).sum()))
                            kf[s:s + SLICE][eq] = True
                        masks.append(keep)
        return masks

    # Warm-up on a small model: the first use of each op faults its code pages into RSS, which is not data memory.
    small = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(2)])
    call(small, [m.weight for m in small], round(AMOUNT * 2 * 64 * 64))
    exact_peak = _reset_peak()
    rss0, hwm0 = harness.proc_status("VmRSS"), harness.proc_status("VmHWM")
    t0 = time.perf_counter()
    masks = call(model, weights, k)
    seconds = time.perf_counter() - t0
    peak = max(harness.proc_status("VmHWM"), hwm0 if not exact_peak else 0)
    digest, pruned = _digest(masks) if masks else ("", k)
    if masks:
        # weights tied with the threshold may be pruned in any order: compare the masks off those entries
        # (on a fresh copy of the weights: nnopt's pruning zeroes the pruned ones in place)
        from nnopt.prune._select import kth_smallest

        torch.manual_seed(0)
        layers_ = [torch.nn.Linear(width, width) for _ in range(layers)]
        fresh = [m.weight.detach() for m in layers_]
        tau, _ = kth_smallest(fresh, None, k, magnitude=True)
        digest, _ = _digest([m | (w.abs() == tau) for m, w in zip(masks, fresh)])
    return dict(provider=provider, seconds=seconds, extra_mb=(peak - rss0) / 2**20, digest=digest, pruned=pruned,
                k=k, params=n, exact_peak=exact_peak)


def in_subprocess(provider, layers, width):
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import json, "
            f"bench_prune; print(json.dumps(bench_prune.run_one({provider!r}, {layers}, {width})))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"{provider} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def providers():
    from nnopt import backends

    out = ["torch"]
    if os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnopt", "prune",
                                   "global_.py")):
        out.append("nnopt.global")
    for b in ("cpu", "torch"):
        if backends.missing(b, "cpu", "select") is None:
            out += [f"select+mask {b}", f"select {b}"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 × Linear(512, 512)")
    ap.add_argument("--runs", type=int, default=3, help="subprocess runs per nnopt provider (torch runs once)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.quick, args.runs, not args.no_record)
    return 1 if any(r["masks = torch"] != "yes" for r in rows) else 0


def run(quick=False, runs=3, record=True):
    """Times each provider's global L1 pruning in fresh subprocesses; returns the table's rows (dicts)."""
    layers, width = (2, 512) if quick else (6, 4096)
    rows = []
    for p in providers():
        results = [in_subprocess(p, layers, width) for _ in range(1 if p == "torch" else runs)]
        r = results[0]
        r["seconds"] = statistics.median(x["seconds"] for x in results)
        r["extra_mb"] = max(x["extra_mb"] for x in results)
        rows.append(r)
        print(f"{p:22s} {r['seconds']:8.3f} s  {r['extra_mb']:9.1f} MiB extra", flush=True)
    base = rows[0]
    for r in rows:
        r["time vs torch"] = f"{base['seconds'] / r['seconds']:.1f}x faster"
        r["memory vs torch"] = f"{base['extra_mb'] / max(r['extra_mb'], 1e-9):.1f}x less"
        r["masks = torch"] = "yes" if not r["digest"] or r["digest"] == base["digest"] else "NO"
        if r["digest"] and r["pruned"] != base["pruned"]:
            r["masks = torch"] = f"NO ({r['pruned']} pruned)"
        r["seconds"] = float(r["seconds"])
        r["extra MiB"] = float(r["extra_mb"])
    cols = ["provider", "seconds", "extra MiB", "time vs torch", "memory vs torch", "masks = torch"]
    text = harness.table(rows, cols)
    print(text)
    bad = [r["provider"] for r in rows if r["masks = torch"] != "yes"]
    if bad:
        print("MISMATCH:", ", ".join(bad))
    if record:
        size = f"{layers} × Linear({width}, {width}), {base['params'] / 1e6:.1f}M weights, fp32, CPU"
        harness.append_results(
            f"Global L1 pruning at {AMOUNT:.0%}{' (quick)' if quick else ''}",
            f"Model: {size}. Time of one call (median of {runs} fresh subprocesses for nnopt, one for torch); "
            "extra = rise of peak RSS over RSS before the call (masks included: 1 byte per weight).\n\n" + text)
    return rows


if __name__ == "__main__":
    sys.exit(main())
