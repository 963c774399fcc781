"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

Per layer, with ``W`` ``[out, in]`` and the calibration inputs' ``H = Σ_t x_t x_tᵀ`` ``[in, in]``:

    dead = diag(H) == 0:  H[j, j] = 1, W[:, j] = 0        (inputs never active on the calibration data)
    H += percdamp · mean(diag(H)) · I
    U = cholesky(H⁻¹, upper)                                (the rows of U are the OBS updates, in column order)
    for each column block [i1, i2) of ``blocksize`` columns:
        choose the block's mask from  w² / U[j, j]²  (the OBS saliency), on the weights as updated so far
        for each column j of the block:  q = w_j pruned by the mask;  e = (w_j - q) / U[j, j]
                                         W[:, j:] -= e ⊗ U[j, j:]         (the remaining weights compensate)
        (lazy batch: inside the block, then once for the columns after it: W[:, i2:] -= E · U[i1:i2, i2:])

Mask choice per pattern (the paper's "adaptive mask selection"):
- unstructured: each column block prunes exactly ``floor(out · width · sparsity)`` of its entries, the lowest
  saliencies (the paper's code prunes ``<=`` a threshold, which can overshoot on ties; this count is exact);
- N:M: at the first column of each group of M, each row prunes the M - N lowest saliencies of the group
  (``blocksize`` is rounded up to a multiple of M);
- (bn, bk) blocks: each column block (rounded up to a multiple of bk) prunes ``floor(tiles · sparsity)`` of its
  bn × bk tiles, those with the lowest summed saliency.
Ties go by a stable ascending sort: the lower (row-major) index is pruned first. Entries an earlier mask pruned
score -1 and are always pruned.

The computation runs in float32 (float64 when the weight is float64); the Cholesky factor is torch.linalg's.
The Hessian is most of the time on CPU. By default (``hessian_dtype=None``), on CPUs with AMX-BF16 (Sapphire Rapids
and later) it runs split: x = hi + lo with hi = bf16(x), lo = bf16(x - hi), H = hiᵀhi + hiᵀlo + loᵀhi +
diag(loᵀlo) on AMX tiles accumulating in float32 (nnopt.prune.oneshot.Stats): relative Frobenius error ~1e-6
against the float64 Hessian, the same masks as float32 accumulation (bench/RESULTS.md, issue 14), ~2.5x faster.
Elsewhere the default is float32; ``hessian_dtype=torch.float32`` is the exact opt-out everywhere.
``hessian_dtype=torch.bfloat16`` rounds x to bf16 once (hiᵀhi only, ~5x float32 on AMX; relative error ~1e-4).
"""

import torch

from nnopt import backends
from nnopt.prune import oneshot

FAMILY = "oneshot"

__all__ = ["inverse_hessian_factor", "sparsegpt", "sparsegpt_prune"]


def inverse_hessian_factor(hessian, percdamp=0.01, name="weight"):
    """(U, dead): U the upper Cholesky factor of the damped ``hessian``'s inverse, dead the inputs with H_jj = 0.

    ``hessian`` [K, K] (float32 or float64) is overwritten: U is computed in its storage (no K×K copy).
    RuntimeError naming the layer when the damped Hessian is not positive definite.

    One Cholesky and one triangular inverse: with P the order reversal and P H P = L Lᵀ,
    H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P), and P L⁻¹ P is upper triangular with a positive diagonal, so it is U. The
    paper's code (Cholesky, cholesky_inverse, Cholesky of the inverse) does twice the flops: 0.55 s against
    0.90 s at K=4096 on 2 cores here.
    """
    h = hessian
    diag = h.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(percdamp * diag.mean())
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    _reverse_(h)
    # In place (out= the input): the factor and its inverse reuse the Hessian's storage.
    torch.linalg.cholesky_ex(h, out=(h, info))
    if info.item():
        raise RuntimeError(f"sparsegpt: the damped Hessian of layer {name!r} is not positive definite "
                           f"(percdamp={percdamp}); raise percdamp")
    _lower_inverse_(h)
    _reverse_(h)
    upper = h
    return upper, dead


def _reverse_(h, rows=256):
    """h[i, j] = h[K-1-i, K-1-j] in place, ``rows`` rows at a time (no K×K temporary)."""
    k = h.shape[0]
    for a in range(0, k // 2, rows):
        b = min(a + rows, k // 2)
        top = h[a:b].flip(0, 1)
        h[a:b] = h[k - b:k - a].flip(0, 1)
        h[k - b:k - a] = top
    if k % 2:
        h[k // 2].copy_(h[k // 2].flip(0))


def _lower_inverse_(l, leaf=256):
    """l = l⁻¹ in place for a lower-triangular l [n, n] (zeros above the diagonal, as cholesky leaves them):
    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]], the halves recursively, the products as GEMMs
    (one (n/2)² temporary)."""
    n = l.shape[0]
    if n <= leaf:
        l.copy_(torch.linalg.solve_triangular(l, torch.eye(n, dtype=l.dtype, device=l.device), upper=False))
        return
    m = n // 2
    _lower_inverse_(l[:m, :m], leaf)
    _lower_inverse_(l[m:, m:], leaf)
    b = l[m:, :m]
    b.copy_(torch.mm(l[m:, m:], torch.mm(b, l[:m, :m])).neg_())


def _block_width(pattern, blocksize):
    unit = pattern.m if pattern.kind == "nm" else pattern.block[1] if pattern.kind == "block" else 1
    return -(-blocksize // unit) * unit


def _lowest(tmp, count):
    """Bool mask of the ``count`` lowest entries of ``tmp`` (flattened; equal values: the lower index first), what a
    stable ascending sort picks, found with one k-th value and a tie pass (~5x the sort on a 4096×128 block)."""
    flat = tmp.flatten()
    if count <= 0:
        return torch.zeros_like(tmp, dtype=torch.bool)
    if count >= flat.numel():
        return torch.ones_like(tmp, dtype=torch.bool)
    threshold = torch.kthvalue(flat, count).values  # the largest value pruned
    low = flat < threshold
    ties = flat == threshold
    room = count - low.sum()  # how many entries equal to the threshold are pruned
    return (low | (ties & (ties.cumsum(0) <= room))).reshape(tmp.shape)


@torch.no_grad()
def sparsegpt_prune(weight, upper, dead, pattern, sparsity=None, blocksize=128, old=None, backend=None):
    """SparseGPT on one layer: (new weight, keep mask), both ``[out, in]``; see the module docstring.

    weight: ``[out, in]`` (any float dtype; computed in float32, float64 stays float64); upper, dead: from
    ``inverse_hessian_factor``; pattern: a Pattern or its spelling; sparsity: float in [0, 1) (None for N:M);
    old: an earlier keep-mask or None; backend: the column-block update's (family "oneshot": "cpu" runs
    csrc/cpu/oneshot.cpp, "torch" the reference loop; see nnopt.backends). Returns the pruned weight in the
    computation dtype.
    """
    impl = backends.implementation(FAMILY, backends.resolve(FAMILY, backend, weight.device))
    pattern = pattern if isinstance(pattern, oneshot.Pattern) else oneshot.parse_pattern(pattern)
    sparsity = pattern.sparsity if pattern.kind == "nm" else sparsity
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(dtype=dtype, copy=True)
    upper = upper.to(dtype)
    rows, cols = w.shape
    w[:, dead] = 0
    pruned_old = None if old is None else ~old
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    width = _block_width(pattern, blocksize)
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        d = u1.diagonal()
        old1 = None if pruned_old is None else pruned_old[:, i1:i2]
        if pattern.kind == "unstructured":
            tmp = w1.square() / d.square().unsqueeze(0)
            if old1 is not None:
                tmp.masked_fill_(old1, -1.0)
            mask1 = _lowest(tmp, int(tmp.numel() * sparsity))
        elif pattern.kind == "block":
            bn, bk = pattern.block
            tmp = w1.square() / d.square().unsqueeze(0)
            if old1 is not None:
                tmp.masked_fill_(old1, 0.0)
            tiles = tmp.reshape(rows // bn, bn, count // bk, bk).sum(dim=(1, 3))
            if old1 is not None:
                emptied = old1.reshape(rows // bn, bn, count // bk, bk).all(dim=3).all(dim=1)
                tiles.masked_fill_(emptied, -1.0)
            low = _lowest(tiles, int(tiles.numel() * sparsity))
            mask1 = low.reshape(rows // bn, 1, count // bk, 1).expand(-1, bn, -1, bk).reshape(rows, count).clone()
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if old1 is not None:
            mask1 |= old1
        w1 = w1.contiguous()
        err1 = torch.empty_like(w1)
        mask1 = mask1.contiguous()
        impl.sparsegpt_block(w1, u1.contiguous(), mask1, err1, pattern.n, pattern.m)
        w[:, i1:i2] = w1
        if i2 < cols:
            w[:, i2:].addmm_(err1, upper[i1:i2, i2:], alpha=-1.0)
        keep[:, i1:i2] = ~mask1
    return w, keep


class _SparseGPT:
    stats = "hessian"

    def __init__(self, blocksize, percdamp, backend, hessian_dtype=None):
        self.blocksize, self.percdamp, self.backend = blocksize, percdamp, backend
        self.stats_dtype = hessian_dtype
        self._factor = None  # (hessian id, U, dead): layers of one group share their input, so their factor

    def check(self, name, module):
        pass

    def prune(self, weight, stats, sparsity, pattern, old, name):
        if self._factor is None or self._factor[0] is not stats:
            self._factor = None
            upper, dead = inverse_hessian_factor(stats, self.percdamp, name)
            self._factor = (stats, upper, dead)
        return sparsegpt_prune(weight, self._factor[1], self._factor[2], pattern, sparsity, self.blocksize, old,
                               self.backend)

    def release(self):
        self._factor = None


def _check_args(blocksize, percdamp, hessian_dtype=None):
    oneshot.Stats.check_dtype(hessian_dtype)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be an int >= 1, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp > 0:
        raise ValueError(f"percdamp must be a float > 0, got {percdamp!r}")


def sparsegpt(model, calibration, sparsity=None, pattern="unstructured", blocksize=128, percdamp=0.01, layers=None,
              skip=("lm_head", "*.lm_head"), blocks=None, atomic=True, backend=None, owl=None,
              hessian_dtype=None):
    """Prunes ``model``'s linear layers in place with SparseGPT; returns ``{layer name: sparsity}``.

    Arguments as ``nnopt.prune.wanda``, plus blocksize (columns per lazy-update block, 128 as the paper) and
    percdamp (damping, a fraction of the Hessian's mean diagonal). The remaining weights are updated to
    reconstruct each layer's outputs on the calibration inputs. backend: the column-block update's (None: auto).
    owl: None or (M, lambda) for OWL's per-block sparsities (see ``nnopt.prune.oneshot``).
    hessian_dtype: how the calibration Hessian XᵀX (float32 K×K) is computed. None (default): "split" where
    ``nnopt.prune.oneshot.split_hessian_available()`` (a CPU with AMX-BF16 whose tile state the OS grants; checked
    once per process), else torch.float32. "split": x = hi + lo in two bf16 parts, hiᵀhi + hiᵀlo + loᵀhi +
    diag(loᵀlo) on AMX tiles with float32 accumulation: float32-class accuracy (relative error ~1e-6, same masks
    as float32 accumulation), ~2.5x faster than float32 on a 2-core Sapphire Rapids. torch.float32: exact
    float32 products (the opt-out). torch.bfloat16: x rounded to bf16 once, ~5x float32 on AMX (float32
    accumulation; elsewhere oneDNN's per-batch bf16 product), relative error ~1e-4: small mask changes.
    """
    _check_args(blocksize, percdamp, hessian_dtype)
    backends.requested(backend)  # an unknown name fails here, before anything runs
    method = _SparseGPT(blocksize, float(percdamp), backend, hessian_dtype)
    try:
        return oneshot.run(model, calibration, method, sparsity, pattern, layers, skip, blocks, atomic, "sparsegpt",
                           owl)
    finally:
        method.release()
