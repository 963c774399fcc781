"""Shared benchmark harness: interleaved median timings, floors measured in the same run, ratio tables, and the
dated entry appended to bench/RESULTS.md.

Timing: providers run round-robin (so drift on a shared machine hits all of them alike); each sample times
``inner`` calls; the reported figure is the median sample. On CUDA, samples are bracketed by CUDA events.
"""

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_providers(providers, device, repeats=15, inner=3, warmup=2):
    """providers: {name: fn()}. Returns {name: median seconds per call}, interleaving providers each repeat."""
    cuda = torch.device(device).type == "cuda"
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(device, nbytes=None, repeats=15):
    """Measured bytes/s of a large device copy, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = (2 << 30) if torch.device(device).type == "cuda" else (512 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_providers({"copy": lambda: dst.copy_(src)}, device, repeats=repeats, inner=2)["copy"]
    return 2 * n * 4 / t


def inplace_bandwidth(device, nbytes=None, repeats=15):
    """Measured bytes/s of a large in-place pass (``x.mul_(c)``: each byte read once and written back).

    A copy_ also pays a read-for-ownership of its destination on CPUs, so an optimizer step, which writes back
    what it read, can beat the copy floor; this floor has no such slack.
    """
    if nbytes is None:
        nbytes = (2 << 30) if torch.device(device).type == "cuda" else (512 << 20)
    x = torch.randn(nbytes // 4, device=device)
    t = time_providers({"mul_": lambda: x.mul_(1.0000001)}, device, repeats=repeats, inner=2)["mul_"]
    return 2 * x.numel() * 4 / t


def proc_status(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where the kernel does not report it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def machine():
    """One line naming the machine or card."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def versions():
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS)).stdout.strip()
    except OSError:
        commit = ""
    if commit:
        parts.append(f"commit {commit}")
    return ", ".join(parts)


def table(rows, columns):
    """A Markdown table from dict rows."""
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return str(v)


def append_results(title, body):
    """Appends a dated entry (machine, versions, then ``body``) to bench/RESULTS.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = f"\n## {title} — {stamp}\n\nMachine: {machine()}. Versions: {versions()}.\n\n{body}\n"
    if not os.path.exists(RESULTS):
        with open(RESULTS, "w") as f:
            f.write("# Benchmark results\n\nAppended by the scripts in bench/; newest last. Ratios are measured "
                    "side by side in one run (medians of interleaved repeats).\n")
    with open(RESULTS, "a") as f:
        f.write(entry)
