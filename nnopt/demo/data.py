"""The demo's data: scikit-learn's bundled digits (no download), or a user's ``.npz`` / IDX files.

``.npz``: arrays ``x`` (N × features, or N × H × W images) and ``y`` (N integer labels), optionally
``x_test``/``y_test``. IDX (the MNIST format): a directory holding ``*images*idx3-ubyte`` and ``*labels*idx1-ubyte``
files (``train-`` and ``t10k-`` prefixes give the split), or one images file with its labels file beside it.
Features are scaled to [0, 1]; without a given test split, a seeded 80/20 split is made.
"""

import gzip
import os
import struct

import numpy as np
import torch


class DataError(ValueError):
    """The data path or file is unusable; the message says why in one line."""


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the demo needs scikit-learn's bundled digits: pip install scikit-learn") from e
    d = load_digits()
    return d.data.astype(np.float32) / 16.0, d.target.astype(np.int64), None, None


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _idx(path):
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    if not os.path.isdir(path):  # one images file: its labels file is the idx1 file beside it with the same prefix
        stem = os.path.basename(path).split("images")[0]
        files = [path] + [f for f in files if "idx1" in os.path.basename(f) and os.path.basename(f).startswith(stem)]
    images = [f for f in files if "idx3" in os.path.basename(f)]
    labels = [f for f in files if "idx1" in os.path.basename(f)]
    if not images or len(images) != len(labels):
        raise DataError(f"{path}: expected IDX image files (*idx3-ubyte) each with a labels file (*idx1-ubyte)")
    split = {}
    for img, lab in zip(images, labels):
        part = "test" if os.path.basename(img).startswith("t10k") else "train"
        split[part] = (_read_idx(img).astype(np.float32) / 255.0, _read_idx(lab).astype(np.int64))
    train = split.get("train") or split.get("test")
    test = split.get("test") if "train" in split else None
    return train[0], train[1], *(test if test is not None else (None, None))


def _npz(path):
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: an .npz needs arrays 'x' and 'y', found {sorted(arrays)}")
    x, y = arrays["x"].astype(np.float32), arrays["y"]
    scale = float(np.abs(x).max()) if x.size else 1.0
    x = x / (scale if scale > 1.0 else 1.0)
    xt, yt = arrays.get("x_test"), arrays.get("y_test")
    if (xt is None) != (yt is None):
        raise DataError(f"{path}: give both 'x_test' and 'y_test', or neither")
    if xt is not None:
        xt = xt.astype(np.float32) / (scale if scale > 1.0 else 1.0)
    return x, y, xt, yt


def _check(x, y, what):
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) < 10:
        raise DataError(f"{what}: x must be N × features (or N × H × W) and y N labels with N ≥ 10; got x "
                        f"{tuple(x.shape)}, y {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{what}: labels y must be non-negative integers, got dtype {y.dtype}")


def load(path=None, device="cpu", seed=0):
    """(x_train, y_train, x_test, y_test, name) as float32 / int64 tensors on ``device``; x flattened to 2-D."""
    if path is None:
        x, y, xt, yt = _digits()
        name = "digits (scikit-learn, 8×8)"
    else:
        if not os.path.exists(path):
            raise DataError(f"--data {path}: no such file or directory")
        x, y, xt, yt = _npz(path) if path.endswith(".npz") else _idx(path)
        name = os.path.basename(os.path.normpath(path))
    _check(x, y, path or "digits")
    x = x.reshape(len(x), -1)
    if xt is None:
        perm = np.random.default_rng(seed).permutation(len(x))
        n = int(0.8 * len(x))
        x, y, xt, yt = x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]
    else:
        _check(xt, yt, f"{path}: test split")
        xt = xt.reshape(len(xt), -1)
        if xt.shape[1] != x.shape[1]:
            raise DataError(f"{path}: test features {xt.shape[1]} differ from train features {x.shape[1]}")
    as_t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)  # noqa: E731
    return (as_t(x, torch.float32), as_t(y.astype(np.int64), torch.long), as_t(xt, torch.float32),
            as_t(yt.astype(np.int64), torch.long), name)
