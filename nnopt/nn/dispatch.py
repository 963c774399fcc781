"""How a masked linear call runs: the cached block layout of a mask, the cost model behind ``auto``, and the
implementations (namespaces with masked_linear / masked_linear_dx / masked_linear_dw) it chooses between.

``auto`` compares the block-sparse kernels' predicted time with dense F.linear's and takes the sparse kernels
only where they are predicted to win by a margin (so the layer is never measurably slower than dense):

    t_sparse / t_dense ≈ empty + block_density · (full − empty)

with ``full`` and ``empty`` the kernels' time relative to dense F.linear with every tile kept and with none,
measured on this machine per dtype, tile and shape class by a short probe on first use (nnopt.nn.calibrate,
cached on disk). On GPUs the constants EFFICIENCY and OVERHEAD below stand in for the probe.
On GPUs with 2:4 sparse tensor cores, a 2:4 mask at inference
(no gradient needed) in fp16/bf16 runs on torch's semi-structured sparse tensors.
"""

import collections
import types
import weakref

import torch

from nnopt import backends, sparsity
from nnopt.nn import calibrate
from nnopt.nn.layout import BlockLayout

FAMILY = "masked_linear"

# GPUs (CPUs measure theirs: nnopt.nn.calibrate): sparse-tile throughput relative to dense GEMM per tile side
# (the nearest listed for other sizes), from bench/bench_masked_linear.py (see bench/RESULTS.md).
EFFICIENCY = {
    "cuda": {16: 0.3, 32: 0.55, 64: 0.7, 128: 0.75},
}
# Fixed cost of a sparse call in dense-GEMM flop equivalents (launches, layout reads, allocation).
OVERHEAD = {"cuda": 5e7}
DECODE_ROWS = 16  # GPU: rows up to which the Triton forward runs split-K (nnopt.kernels.masked_linear)
# The sparse kernels must be predicted this much faster before auto takes them.
MARGIN = 1.1

_LAYOUTS = collections.OrderedDict()  # id(mask) -> (weakref to mask, version, block sizes, layout)
_LAYOUT_CACHE_SIZE = 256


def cached_layout(mask, block_n=32, block_k=32):
    """The BlockLayout of ``mask``, built once and reused until the mask is modified (its version changes), its
    device changes (a new tensor) or it is freed."""
    key = id(mask)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        ref, version, blocks, layout = hit
        if ref() is mask and version == mask._version and blocks == (block_n, block_k):
            _LAYOUTS.move_to_end(key)
            return layout
    layout = BlockLayout(mask, block_n, block_k)
    _LAYOUTS[key] = (weakref.ref(mask), mask._version, (block_n, block_k), layout)
    if len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout


# CPU inference up to this many rows runs on panels packed once and cached (no per-call packing of W ⊙ mask):
# measured faster than the per-call panel kernels up to 256 rows (decode, prefill, batch-256 serving), and
# calibrate's probes cover that range (its largest row class is probed at 256 rows).
PACKED_ROWS = 256


def packed_runner(weight, mask, bias, layout, dtype):
    """A function x2 [M, K] (``dtype``) -> y [M, N] = x2 (W ⊙ mask)ᵀ + bias on panels packed now, in ``dtype``
    (weight and bias converted once, as autocast would per call). CPU only."""
    from nnopt import _ext

    why = _ext.load()
    if why is not None:
        raise backends.BackendUnavailable(f"nnopt backend 'cpu' is unavailable: {why}")
    ops = torch.ops.nnopt
    n, _ = layout.shape
    with torch.no_grad():
        packed = ops.masked_linear_pack(weight.detach().contiguous(), mask.contiguous(), layout.row_ptr,
                                        layout.col_idx, layout.full, layout.block_n, layout.block_k, dtype)
        b = bias.detach().to(dtype).contiguous() if bias is not None else None
    op = ops.masked_linear_packed.default
    row_ptr, col_idx, bn, bk = layout.row_ptr, layout.col_idx, layout.block_n, layout.block_k
    return lambda x2: op(x2, packed, b, row_ptr, col_idx, n, bn, bk)


def packed_pays(layout, dtype, m, device_type="cpu"):
    """Whether auto takes the packed kernels for an inference call of m rows (the calibrated cost model)."""
    if device_type != "cpu" or layout.density == 1.0:
        return False
    if layout.nnzb == 0:
        return True
    return calibrate.predicted_speedup("packed", device_type, dtype, layout, m) >= MARGIN


class _Packed:
    """Inference on CPU through packed_runner, the panels cached per weight, mask, bias and dtype (and their
    versions): the functional form's path (MaskedLinear keeps its own cache on the module)."""

    def __init__(self):
        self._cache = collections.OrderedDict()  # id(weight) -> (weakref to weight, key, runner)

    def masked_linear(self, x, weight, mask, bias, layout):
        key = (id(mask), mask._version, weight._version, weight.data_ptr(), x.dtype, layout,
               None if bias is None else (id(bias), bias._version))
        hit = self._cache.get(id(weight))
        if hit is None or hit[0]() is not weight or hit[1] != key:
            hit = (weakref.ref(weight), key, packed_runner(weight, mask, bias, layout, x.dtype))
            self._cache[id(weight)] = hit
            if len(self._cache) > _LAYOUT_CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(id(weight))
        return hit[2](x.contiguous())


PACKED = _Packed()


def predicted_speedup(layout, m, device_type, dtype=torch.float32):
    """Predicted dense time / block-sparse time for an autograd call of m rows: measured on this machine for CPU
    (nnopt.nn.calibrate), the constants above for GPUs."""
    if device_type == "cpu":
        return calibrate.predicted_speedup("batch", device_type, dtype, layout, m)
    if m <= DECODE_ROWS:
        # GPU decode shapes (the Triton split-K forward): bound by the bytes of W read, so the kept tiles' share
        # plus two launches' worth. Not yet measured on a card: bench/gpu_check.sh times it against cuBLAS.
        return 1.0 / (1.25 * layout.block_density + 0.05)
    table = EFFICIENCY.get(device_type, EFFICIENCY["cuda"])
    block = min(layout.block_n, layout.block_k)
    eff = table[min(table, key=lambda b: abs(b - block))]
    n, k = layout.shape
    flops = max(1, m * n * k)
    ratio = layout.block_density / eff + OVERHEAD.get(device_type, OVERHEAD["cuda"]) / flops
    return 1.0 / max(ratio, 1e-9)


def _masked_weight_products():
    """Dense F.linear products for a weight that already holds zeros at masked entries (the pruning contract):
    no masking pass in forward or dx; dW is masked in place."""

    def masked_linear(x, weight, mask, bias, layout):
        return torch.nn.functional.linear(x, weight, bias)

    def masked_linear_dx(dy, weight, mask, layout):
        return dy @ weight

    def masked_linear_dw(dy, x, mask, layout):
        return sparsity.zero_pruned_(dy.t() @ x, mask)  # in place, no ~mask temporary

    return types.SimpleNamespace(masked_linear=masked_linear, masked_linear_dx=masked_linear_dx,
                                 masked_linear_dw=masked_linear_dw)


DENSE_MASKED = _masked_weight_products()


def _dense(weight_is_masked):
    """Dense products: the reference (masking the weight) or, for a weight known to hold its zeros, DENSE_MASKED."""
    return DENSE_MASKED if weight_is_masked else backends.implementation(FAMILY, "torch")


class _SemiStructured:
    """Inference on GPU 2:4 sparse tensor cores (torch.sparse.to_sparse_semi_structured), the compressed weight
    cached per weight version. Forward only: chosen when no gradient is needed."""

    def __init__(self):
        self._cache = {}

    def masked_linear(self, x, weight, mask, bias, layout):
        key = id(weight)
        hit = self._cache.get(key)
        if hit is None or hit[0]() is not weight or hit[1] != weight._version:
            w = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
            hit = (weakref.ref(weight), weight._version, torch.sparse.to_sparse_semi_structured(w))
            self._cache = {key: hit} if len(self._cache) > 64 else dict(self._cache, **{key: hit})
        return torch.nn.functional.linear(x, hit[2], bias)


SEMI_STRUCTURED = _SemiStructured()


def _semi_structured_ok(layout, m, weight, grad_needed):
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16) or not layout.is_2_4:
        return False
    if grad_needed:  # forward only: no gradient for x, weight or bias
        return False
    n, k = layout.shape
    if n % 64 or k % 128 or m < 64 or torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    return hasattr(torch.sparse, "to_sparse_semi_structured")


def choose(layout, m, weight, backend, weight_is_masked=False, grad_needed=True):
    """The implementation for this call: ``backend`` forced ("cpu", "triton", "torch", "cuda"), else auto.
    ``grad_needed``: whether the call builds an autograd node (the 2:4 path is inference only)."""
    name = backends.requested(backend)
    device = weight.device
    inference = not grad_needed and device.type == "cpu" and 0 < m <= PACKED_ROWS
    if name != "auto":
        name = backends.resolve(FAMILY, name, device)  # raises, saying what is missing, when it cannot run
        if name == "cpu" and inference:
            return PACKED
        return _dense(weight_is_masked) if name == "torch" else backends.implementation(FAMILY, name)
    if _semi_structured_ok(layout, m, weight, grad_needed):
        return SEMI_STRUCTURED
    sparse = backends.resolve(FAMILY, "auto", device)
    if sparse == "torch" or layout.density == 1.0 or weight.dtype == torch.float64 and sparse == "triton":
        return _dense(weight_is_masked or layout.density == 1.0)
    if inference and sparse == "cpu":
        return PACKED if packed_pays(layout, weight.dtype, m) else _dense(weight_is_masked)
    if layout.nnzb == 0 or predicted_speedup(layout, m, device.type, weight.dtype) >= MARGIN:
        return backends.implementation(FAMILY, sparse)
    return _dense(weight_is_masked)
