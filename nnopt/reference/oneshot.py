"""Plain references of one-shot pruning's per-layer math (Wanda, SparseGPT): the oracles of the tests.

Written for clarity, not speed: Python-level ranking with the documented tie rule spelled out as a sort key, and
SparseGPT as the paper's column-by-column OBS loop without the lazy batching (every update applied to every
remaining column at once), in float64, with H⁻¹ from ``torch.linalg.inv``. Small shapes only.
"""

import torch

__all__ = ["hessian_accumulate", "sparsegpt", "sparsegpt_block", "wanda_mask"]


def hessian_accumulate(h, x, terms):
    """h [K, K] float32 += the upper triangle (i <= j) of hiᵀhi (terms 1) or hiᵀhi + hiᵀlo + loᵀhi + diag(loᵀlo)
    (terms 3), hi = bf16(x), lo = bf16(x - hi), x [T, K] float32; computed in float64 (the ``torch`` backend and
    oracle of csrc/cpu/oneshot.cpp's hessian_accumulate_)."""
    hi = x.to(torch.bfloat16)
    hd = hi.double()
    prod = hd.T @ hd
    if terms == 3:
        ld = (x - hi.float()).to(torch.bfloat16).double()
        cross = hd.T @ ld
        prod += cross + cross.T + torch.diag(ld.square().sum(0))
    h.add_(prod.triu().to(h.dtype))


def sparsegpt_block(w, u, pruned, err, n, m):
    """SparseGPT's column-block update in place (the ``torch`` backend of the oneshot family; see
    csrc/cpu/oneshot.cpp for the semantics): w [rows, count] ends pruned, err gets the column errors, pruned the
    final mask (N:M groups chosen at their first column when m > 0)."""
    count = w.shape[1]
    d = u.diagonal()
    for i in range(count):
        if m and i % m == 0:
            tmp = w[:, i:i + m].square() / d[i:i + m].square().unsqueeze(0)
            tmp.masked_fill_(pruned[:, i:i + m], -1.0)
            idx = torch.sort(tmp, dim=1, stable=True).indices[:, :m - n]
            pruned[:, i:i + m].scatter_(1, idx, True)
        col = w[:, i]
        q = col.masked_fill(pruned[:, i], 0.0)
        e = (col - q) / u[i, i]
        err[:, i] = e
        if i + 1 < count:
            w[:, i + 1:].addr_(e, u[i, i + 1:], alpha=-1.0)
        w[:, i] = q


def _parse(pattern):
    if pattern in (None, "unstructured"):
        return "unstructured", None
    if isinstance(pattern, str):
        n, m = map(int, pattern.split(":"))
        return "nm", (n, m)
    return "block", tuple(pattern)


def _top(values, count):
    """Indices of the ``count`` largest values; equal values: the lower index first."""
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return order[:count]


def _bottom(values, count):
    """Indices of the ``count`` smallest values; equal values: the lower index first."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    return order[:count]


def wanda_mask(weight, norms, pattern="unstructured", sparsity=None, comparison="output"):
    """Keep-mask ``[out, in]`` of score ``|W_ij| · norms_j`` (float32): per row (or per layer), per N:M group, or
    per block."""
    kind, arg = _parse(pattern)
    score = weight.abs().float() * norms.float().unsqueeze(0)
    rows, cols = score.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    if kind == "block":
        bn, bk = arg
        tiles = score.reshape(rows // bn, bn, cols // bk, bk).sum(dim=(1, 3))
        flat = tiles.flatten().tolist()
        for t in _top(flat, len(flat) - int(len(flat) * sparsity)):
            r, c = divmod(t, cols // bk)
            keep[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] = True
        return keep
    if kind == "unstructured" and comparison == "layer":
        flat = score.flatten().tolist()
        for t in _top(flat, len(flat) - int(len(flat) * sparsity)):
            keep[t // cols, t % cols] = True
        return keep
    for r in range(rows):
        row = score[r].tolist()
        if kind == "nm":
            n, m = arg
            for g in range(0, cols, m):
                for j in _top(row[g:g + m], n):
                    keep[r, g + j] = True
        else:
            for j in _top(row, cols - int(cols * sparsity)):
                keep[r, j] = True
    return keep


def sparsegpt(weight, hessian, pattern="unstructured", sparsity=None, blocksize=128, percdamp=0.01):
    """(pruned weight float64, keep mask) of SparseGPT on ``weight`` ``[out, in]`` with ``hessian`` ``[in, in]``."""
    kind, arg = _parse(pattern)
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    unit = arg[1] if kind in ("nm", "block") else 1
    width = -(-blocksize // unit) * unit
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        d2 = torch.diag(hinv)[i1:i2] ** 2
        if kind == "unstructured":
            tmp = (w[:, i1:i2] ** 2 / d2).flatten().tolist()
            for t in _bottom(tmp, int(len(tmp) * sparsity)):
                pruned[t // (i2 - i1), i1 + t % (i2 - i1)] = True
        elif kind == "block":
            bn, bk = arg
            tmp = w[:, i1:i2] ** 2 / d2
            tiles = tmp.reshape(rows // bn, bn, (i2 - i1) // bk, bk).sum(dim=(1, 3))
            per_row = (i2 - i1) // bk
            flat = tiles.flatten().tolist()
            for t in _bottom(flat, int(len(flat) * sparsity)):
                r, c = divmod(t, per_row)
                pruned[r * bn:(r + 1) * bn, i1 + c * bk:i1 + (c + 1) * bk] = True
        for j in range(i1, i2):
            if kind == "nm" and (j - i1) % arg[1] == 0:
                n, m = arg
                tmp = w[:, j:j + m] ** 2 / torch.diag(hinv)[j:j + m] ** 2
                for r in range(rows):
                    for c in _bottom(tmp[r].tolist(), m - n):
                        pruned[r, j + c] = True
            q = torch.where(pruned[:, j], 0.0, w[:, j])
            err = (w[:, j] - q) / hinv[j, j]
            w[:, j:] -= torch.outer(err, hinv[j, j:])
            w[:, j] = q
    return w, ~pruned
