"""The main job: train a small MLP on scikit-learn's bundled digits with each nnopt optimizer beside its
torch.optim twin, printing test accuracy and the median time of `optimizer.step()` per backend.

No download: the digits (1,797 8×8 images) ship with scikit-learn.
"""

import os
import statistics
import time

import torch

from nnopt import backends

OPTIMIZERS = [
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("Adam", dict(lr=1e-3)),
    ("AdamW", dict(lr=1e-3, weight_decay=1e-2)),
    ("Adagrad", dict(lr=0.05)),
    ("RMSprop", dict(lr=1e-3)),
]


def load_digits(device):
    """(x_train, y_train, x_test, y_test): 1,437 / 360 split, features scaled to [0, 1], float32."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:
        raise ImportError("the demo needs scikit-learn's bundled digits: pip install scikit-learn") from e
    data = sk_load()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    n = int(0.8 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


def train(make_optimizer, data, steps, device, batch=64):
    """Trains a fresh MLP; returns (test accuracy, median step time in ms)."""
    x, y, xt, yt = data
    model = make_mlp().to(device)
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return acc, 1e3 * statistics.median(times)


def run(quick=False, device=None, backends_=None, steps=None):
    import nnopt.optim

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if backends_:
        names = [b.strip() for b in backends_.split(",") if b.strip()]
        for b in names:
            why = backends.missing(b, device) if b in backends.BACKENDS else f"unknown backend {b!r}"
            if why is not None:
                raise ValueError(f"--backends {b}: {why}")
    else:
        # The interpreter runs Triton kernels on the CPU for tests, far too slowly for a demo.
        names = [b for b in backends.BACKENDS if backends.missing(b, device) is None
                 and not (b == "triton" and device == "cpu")]
    steps = steps or (100 if quick else 600)
    data = load_digits(device)
    print(f"nnopt demo: MLP 64-256-256-10 on digits ({len(data[0])} train / {len(data[2])} test), "
          f"{steps} steps, device {device}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    header = f"{'optimizer':9s} {'implementation':22s} {'test acc':>8s} {'step ms':>8s}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, kwargs in OPTIMIZERS:
        impls = [("torch.optim (for-loop)", lambda ps: getattr(torch.optim, name)(ps, foreach=False, **kwargs)),
                 ("torch.optim (foreach)", lambda ps: getattr(torch.optim, name)(ps, foreach=True, **kwargs))]
        if name != "RMSprop":  # torch has no fused RMSprop
            impls.append(("torch.optim (fused)", lambda ps: getattr(torch.optim, name)(ps, fused=True, **kwargs)))
        impls += [(f"nnopt [{b}]", lambda ps, b=b: getattr(nnopt.optim, name)(ps, backend=b, **kwargs))
                  for b in names]
        for label, make in impls:
            acc, ms = train(make, data, steps, device)
            rows.append((name, label, acc, ms))
            print(f"{name:9s} {label:22s} {acc:8.3f} {ms:8.3f}", flush=True)
    return 0
