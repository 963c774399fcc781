"""auto's cost model, measured on the machine it runs on: a short probe on first use, cached on disk.

``auto`` takes the block-sparse kernels for a layer only where they are predicted to beat dense ``F.linear`` by
dispatch.MARGIN. The prediction is linear in the fraction of kept tiles d (``layout.block_density``):

    t_sparse / t_dense  ≈  empty + d · (full − empty)

where ``full`` and ``empty`` are the kernels' time with every tile kept and with none, relative to dense F.linear
on the same input. They depend on the CPU (its dense BLAS, its memory), the dtype, the tile and the shape, so they
are measured here rather than carried over from another machine: per (kind, device, dtype, tile, shape class) a
probe times dense, full and empty interleaved on a representative shape (a few tens of milliseconds; well under a
second), once. Kinds: ``packed`` (inference, no gradient: nnopt::masked_linear_packed on panels packed once) and
``batch`` (calls that build an autograd node: the panel kernels of nnopt::masked_linear). Shape classes: log2(N·K)
rounded to an even number (probed as a square matrix of that many entries, at most 2048², 1024² for M > 16) and
M in four classes, probed at 1, 16, 64 and 256 rows (M = 1, 2..16, 17..64, more).

The results are kept in a JSON file, one section per machine (CPU model, core count, torch version, threads):
``$NNOPT_CACHE_DIR/auto.json``, default ``~/.cache/nnopt/auto.json``. ``NNOPT_AUTO_PROBE=0`` turns probing off
(the conservative DEFAULTS below are used instead); ``backend=`` and ``NNOPT_BACKEND`` still force a backend.
"""

import json
import math
import os
import platform
import threading
import time

import torch

ENV_DIR = "NNOPT_CACHE_DIR"
ENV_PROBE = "NNOPT_AUTO_PROBE"
# Used when probing is off or fails: (empty, full) per kind. Conservative: full tiles as slow as dense plus a
# fixed share, so auto takes the kernels only at high block sparsity.
DEFAULTS = {"packed": (0.05, 1.1), "batch": (0.05, 1.15)}

_lock = threading.Lock()
_memory = {}  # probe key -> (empty, full)
_loaded = False


def cache_path():
    base = os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "nnopt")
    return os.path.join(base, "auto.json")


def machine_key(device_type="cpu"):
    """What a measurement is valid for: the processor, its core count, torch's version and thread count."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        name = f"{name} x{os.cpu_count()} threads={torch.get_num_threads()}"
    return f"{device_type}|{name}|torch {torch.__version__}"


def m_class(m):
    """The rows a call's M is probed at: 1, 16, 64 or 256."""
    return 1 if m <= 1 else 16 if m <= 16 else 64 if m <= 64 else 256


def shape_class(kind, layout, m=1):
    """(N·K class, M class) of a call: log2(N·K) rounded to even, clipped to the probed range, and m_class(m)."""
    n, k = layout.shape
    mc = m_class(m)
    size = min(max(2 * round(math.log2(max(n * k, 1)) / 2), 16), 22 if mc <= 16 else 20)
    return size, mc


def _key(kind, device_type, dtype, layout, m):
    size, mc = shape_class(kind, layout, m)
    dt = str(dtype).replace("torch.", "")
    return f"{kind}|{device_type}|{dt}|{layout.block_n}x{layout.block_k}|2^{size}|m{mc}"


# The kernels at full density do the work dense does (same bytes, same flops): a probe saying they are faster
# measured a dense call slowed by something else (a busy machine). Never trusted: a layer with every tile kept
# (a 2:4 or unstructured mask) then always runs dense.
MIN_FULL = 1.0


def predicted_speedup(kind, device_type, dtype, layout, m=1):
    """Predicted dense time ÷ kernel time for this layer (its block density) and call (m rows of x)."""
    empty, full = coefficients(kind, device_type, dtype, layout, m)
    full = max(full, MIN_FULL)
    empty = min(max(empty, 0.0), full)
    ratio = empty + layout.block_density * (full - empty)
    return 1.0 / max(ratio, 1e-9)


def coefficients(kind, device_type, dtype, layout, m=1):
    """(empty, full) for this call's probe key: from memory, the disk cache, or a probe run now."""
    if os.environ.get(ENV_PROBE, "1") == "0" or device_type != "cpu":  # before memory: the switch always wins
        return DEFAULTS[kind]
    key = _key(kind, device_type, dtype, layout, m)
    hit = _memory.get(key)
    if hit is not None:
        return hit
    with _lock:
        _load()
        hit = _memory.get(key)
        if hit is None:
            try:
                hit = probe(kind, dtype, layout, m)
            except (RuntimeError, NotImplementedError):  # no kernels here: never take them
                hit = (1.0, 1e9)
            _memory[key] = hit
            _save(key, hit)
    return hit


def _load():
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        for key, value in data.get(machine_key(), {}).items():
            _memory.setdefault(key, tuple(value))
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no cache yet, or unreadable: probe


def _save(key, value):
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data.setdefault(machine_key(), {})[key] = list(value)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home: the figures stay in memory for this process


def _timeit(fns, repeats, budget_s):
    """Min seconds per call of each fn, interleaved (a load spike on a shared machine hits one sample, not one fn)."""
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    deadline = time.perf_counter() + budget_s
    for r in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() > deadline:
            break
    return best


def probe(kind, dtype, layout, m=1):
    """Measures (empty, full) for ``kind`` on a representative shape of the layout's class (see the module
    docstring); returns them and takes a few tens of milliseconds."""
    from nnopt import _ext
    from nnopt.nn.layout import BlockLayout

    why = _ext.load()
    if why is not None:
        raise RuntimeError(why)
    size, mc = shape_class(kind, layout, m)
    side = 1 << (size // 2)
    bn, bk = layout.block_n, layout.block_k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(mc, side, generator=gen).to(dtype)
    w = torch.randn(side, side, generator=gen).to(dtype)
    ops = torch.ops.nnopt
    fns = [lambda: torch.nn.functional.linear(x, w)]
    for keep in (False, True):
        mask = torch.full((side, side), keep, dtype=torch.bool)
        lay = BlockLayout(mask, bn, bk)
        if kind == "packed":
            packed = ops.masked_linear_pack(w, mask, lay.row_ptr, lay.col_idx, lay.full, bn, bk, dtype)
            fns.append(lambda p=packed, lay=lay: ops.masked_linear_packed(x, p, None, lay.row_ptr, lay.col_idx, side,
                                                                          bn, bk))
        else:
            fns.append(lambda mask=mask, lay=lay: ops.masked_linear(x, w, mask, None, lay.row_ptr, lay.col_idx,
                                                                    lay.full, bn, bk))
    with torch.no_grad():
        t_dense, t_empty, t_full = _timeit(fns, repeats=7, budget_s=0.15)
    return (t_empty / t_dense, t_full / t_dense)


def table():
    """The measured coefficients of this machine (probe key -> (empty, full)), for ``nnopt info`` and tests."""
    with _lock:
        _load()
        return dict(_memory)


__all__ = ["predicted_speedup", "coefficients", "probe", "cache_path", "machine_key", "table", "DEFAULTS"]
