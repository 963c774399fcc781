"""Fused distillation loss benchmark: forward + backward of nnopt.transfer.DistillationLoss (kind="kl", T = 2,
alpha = 0.5, hard targets) against the torch eager composition users write:

    kl = F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), reduction="batchmean", log_target=True) * T * T
    loss = alpha * kl + (1 - alpha) * F.cross_entropy(s, y);  loss.backward()

Configurations: CPU fp32, 4,096 rows × 32,000 classes (quick: 1,024 × 32,000); CUDA bf16, 8,192 × 128,256 (a
Llama-3 vocabulary; quick: 2,048 × 128,256). Providers: torch eager, torch.compile of the same function (with
--compile), and every nnopt backend that runs here (cpu on CPU, triton on CUDA).

Check: before timing, every provider's loss and student gradient on the first rows (a separate small batch) are
compared with nnopt's reference computed in float64 (nnopt.testing tolerance for a reduction over V classes).
Time: interleaved medians of forward + backward (harness.time_providers), student.grad reset to None before each
call, so every call allocates its gradient as a training step does. Floor: the bytes the fused op must move (read
student and teacher logits, write the gradient) ÷ the copy bandwidth measured in the same run.
Memory: peak extra memory of one forward + backward over the inputs, each provider in its own subprocess after one
warm-up call: on CPU the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS
before the call; on CUDA torch.cuda.max_memory_allocated() minus memory_allocated() before the call. Both include
the gradient left in student.grad ([B, V], the minimum any provider needs).

    python bench/bench_distill.py [--device cpu|cuda] [--quick] [--repeats N] [--compile] [--no-append]
"""

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from nnopt import backends  # noqa: E402
from nnopt.reference import distill_loss as ref  # noqa: E402
from nnopt.testing import tolerance  # noqa: E402
from nnopt.transfer import DistillationLoss  # noqa: E402

T, ALPHA = 2.0, 0.5
CONFIGS = {  # device type -> (dtype, rows, classes, quick rows)
    "cpu": (torch.float32, 4096, 32000, 1024),
    "cuda": (torch.bfloat16, 8192, 128256, 2048),
}
CHECK_ROWS = 64


def make_inputs(device, dtype, rows, classes, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    s = (2 * torch.randn(rows, classes, device=device, generator=gen)).to(dtype).requires_grad_()
    t = (2 * torch.randn(rows, classes, device=device, generator=gen)).to(dtype)
    y = torch.randint(0, classes, (rows,), device=device, generator=gen)
    return s, t, y


def eager_loss(s, t, y):
    kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), reduction="batchmean",
                  log_target=True) * (T * T)
    return ALPHA * kl + (1 - ALPHA) * F.cross_entropy(s, y)


def provider_losses(device, compile_=False):
    """{label: loss function (s, t, y) -> scalar}: every provider that runs on ``device``."""
    out = {"torch eager": eager_loss}
    if compile_:
        out["torch compile"] = torch.compile(eager_loss)
    for b in backends.BACKENDS:
        if b != "torch" and backends.missing(b, device, "distill_loss") is None:
            if b == "triton" and torch.device(device).type == "cpu":
                continue  # the interpreter is a test tool, not a CPU backend
            out[f"nnopt {b}"] = DistillationLoss(temperature=T, alpha=ALPHA, kind="kl", backend=b)
    return out


def step(fn, s, t, y):
    s.grad = None
    loss = fn(s, t, y)
    loss.backward()
    return loss


def check(losses, device, dtype, classes):
    """Every provider's loss and gradient on a small batch against the float64 reference."""
    s, t, y = make_inputs(device, dtype, CHECK_ROWS, classes, seed=1)
    want, want_grad = ref.distill_loss_fwd(s.detach().double(), t.double(), y, temperature=T, alpha=ALPHA, kind="kl",
                                           beta=0.5, scale=T * T, ignore_index=-100, reduction="batchmean")
    rtol, atol = tolerance(dtype, classes)
    for label, fn in losses.items():
        loss = step(fn, s, t, y)
        scale = float(want_grad.abs().max())
        if not torch.allclose(loss.double(), want, rtol=rtol, atol=atol):
            raise AssertionError(f"{label}: loss {float(loss)} != reference {float(want)}")
        if not torch.allclose(s.grad.double(), want_grad, rtol=rtol, atol=atol * scale):
            err = float((s.grad.double() - want_grad).abs().max())
            raise AssertionError(f"{label}: gradient differs from the reference by {err:.3g} (max |grad| {scale:.3g})")


def measure_memory(label, device, rows, compile_):
    """Peak extra bytes of one forward + backward of provider ``label`` (run in a fresh subprocess)."""
    dtype, _, classes, _ = CONFIGS[torch.device(device).type]
    fn = provider_losses(device, compile_)[label]
    s, t, y = make_inputs(device, dtype, rows, classes)
    step(fn, s, t, y)  # warm-up: lazy initialisation, compilation, thread pools
    s.grad = None
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(fn, s, t, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = harness.proc_status("VmRSS")
    step(fn, s, t, y)
    return harness.proc_status("VmHWM") - before


def memory_in_subprocess(label, device, rows, compile_):
    code = ("import json, sys; sys.path.insert(0, {bench!r}); import bench_distill as b; "
            "print(json.dumps(b.measure_memory({label!r}, {device!r}, {rows}, {compile_})))").format(
        bench=os.path.dirname(os.path.abspath(__file__)), label=label, device=device, rows=rows, compile_=compile_)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {label} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(device, quick=False, repeats=None, compile_=False, append=True):
    dev_type = torch.device(device).type
    dtype, rows, classes, quick_rows = CONFIGS[dev_type]
    rows = quick_rows if quick else rows
    repeats = repeats or (3 if quick else 7)
    losses = provider_losses(device, compile_)
    check(losses, device, dtype, classes)
    bw = harness.copy_bandwidth(device, nbytes=(128 << 20) if quick else None)
    inputs = make_inputs(device, dtype, rows, classes)
    calls = {k: (lambda fn=fn, inputs=inputs: step(fn, *inputs)) for k, fn in losses.items()}
    times = harness.time_providers(calls, device, repeats=repeats, inner=1, warmup=1)
    del calls, inputs  # free the logits before the memory subprocesses run
    memory = {k: memory_in_subprocess(k, device, rows, compile_) for k in losses}
    esize = torch.empty((), dtype=dtype).element_size()
    floor = 3 * rows * classes * esize / bw
    grad_bytes = rows * classes * esize
    base_t, base_m = times["torch eager"], memory["torch eager"]
    table_rows = [{"provider": k, "ms": 1e3 * tm, "x floor": tm / floor, "speedup vs eager": base_t / tm,
                   "peak extra MiB": memory[k] / 2**20, "x grad size": memory[k] / grad_bytes,
                   "memory vs eager": memory[k] / base_m if base_m > 0 else float("nan")}
                  for k, tm in times.items()]
    mem_method = ("VmHWM rise over VmRSS, fresh subprocess per provider" if dev_type == "cpu"
                  else "torch.cuda.max_memory_allocated rise, fresh subprocess per provider")
    body = (f"### distill_loss kl, T={T}, alpha={ALPHA}, {rows} × {classes}, {str(dtype).replace('torch.', '')}, "
            f"{device}{', quick' if quick else ''}\n\n"
            f"Forward + backward. Floor = 3 × B × V × {esize} bytes (read student and teacher, write the gradient) ÷ "
            f"measured copy bandwidth ({bw / 1e9:.1f} GB/s). Memory: {mem_method}; the gradient alone is "
            f"{grad_bytes / 2**20:.0f} MiB.\n\n"
            + harness.table(table_rows, ["provider", "ms", "x floor", "speedup vs eager", "peak extra MiB",
                                         "x grad size", "memory vs eager"]))
    print("\n" + body, flush=True)
    if append:
        harness.append_results(f"bench_distill ({device}{', quick' if quick else ''})", body)
    return table_rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the eager composition")
    ap.add_argument("--no-append", action="store_true", help="do not append the results to bench/RESULTS.md")
    a = ap.parse_args(argv)
    run(a.device, a.quick, a.repeats, a.compile, not a.no_append)


if __name__ == "__main__":
    main()
