"""The masked_linear family at the function level: every backend's forward, dx and dW against the reference.

Inputs are fresh random x, weight, bias and dy (seeded) with a mask [70, 45] (not a multiple of any block size) cut
into 16/32/64-sided tiles; masks are empty, full, one clipped corner tile, a mix of empty/full/partly filled tiles,
and elementwise random at several densities; M is 1, 7, 33 or 0. Weights are nonzero (NaN/inf in one test) where
the mask is false, so every backend must ignore them; dW must be exactly 0 there. The expected values are the
reference (nnopt.reference.masked_linear) computed in float64 and cast to the dtype under test, compared with
nnopt.testing's tolerance for a reduction of length K (forward), N (dx) or M (dW). The Triton kernels run under the
interpreter on CPU; the `gpu` class runs them compiled on CUDA.
"""

import pytest
import torch

from nnopt import backends
from nnopt.nn.layout import BlockLayout
from nnopt.reference import masked_linear as ref
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

FAMILY = "masked_linear"
BACKENDS = ["torch", "cpu", "triton"]
N, K = 70, 45
MASKS = ["empty", "full", "corner", "tiles", "random-0.05", "random-0.3", "random-0.8"]
BLOCKS = [(16, 16), (32, 16), (16, 64), (64, 32)]
MS = [1, 7, 33]
# every mask kind with every block shape; M and bias vary along the list
CASES = [(kind, bn, bk, MS[i % 3], i % 2 == 0)
         for i, (kind, (bn, bk)) in enumerate((kind, b) for kind in MASKS for b in BLOCKS)]
CASE_IDS = [f"{kind}-{bn}x{bk}-M{m}-{'bias' if b else 'nobias'}" for kind, bn, bk, m, b in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def impl(backend, device="cpu"):
    skip_unless_available(backend, device, FAMILY)
    return backends.implementation(FAMILY, backend)


def make_mask(kind, n, k, bn, bk, device="cpu"):
    """A bool [n, k] mask of the given kind (see the module docstring) for block_n × block_k tiles."""
    nb, kb = -(-n // bn), -(-k // bk)
    if kind == "empty":
        return torch.zeros(n, k, dtype=torch.bool, device=device)
    if kind == "full":
        return torch.ones(n, k, dtype=torch.bool, device=device)
    if kind == "corner":  # one non-empty tile, the clipped bottom-right one, partly filled
        mask = torch.zeros(n, k, dtype=torch.bool, device=device)
        corner = mask[(nb - 1) * bn:, (kb - 1) * bk:]
        corner.copy_(torch.rand(corner.shape, device=device) < 0.5)
        corner[-1, -1] = True
        return mask
    if kind == "tiles":  # each tile empty, full or partly filled, so full and masked tiles mix in one row/column
        choice = torch.randint(0, 3, (nb, kb), device=device).repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        partial = torch.rand(nb * bn, kb * bk, device=device) < 0.5
        pad = (choice == 1) | ((choice == 2) & partial)
        return pad[:n, :k].contiguous()
    density = float(kind.split("-")[1])
    return torch.rand(n, k, device=device) < density


def make(kind, bn, bk, m, dtype=torch.float32, device="cpu", n=N, k=K):
    """(x, weight, mask, bias, dy, layout): weight nonzero everywhere, also where the mask is false."""
    mask = make_mask(kind, n, k, bn, bk, device)
    x = torch.randn(m, k, device=device).to(dtype)
    weight = torch.randn(n, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    dy = torch.randn(m, n, device=device).to(dtype)
    return x, weight, mask, bias, dy, BlockLayout(mask, bn, bk)


def expected(op, *args):
    """The reference in float64, cast back to the inputs' dtype."""
    dtype = args[0].dtype
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return getattr(ref, op)(*wide).to(dtype)


def check_forward(fns, x, weight, mask, bias, layout):
    got = fns.masked_linear(x, weight, mask, bias, layout)
    assert got.shape == (x.shape[0], mask.shape[0]) and got.dtype == x.dtype
    assert_close(got, expected("masked_linear", x, weight, mask, bias, layout), reduction_length=mask.shape[1])


def check_dx(fns, dy, weight, mask, layout):
    got = fns.masked_linear_dx(dy, weight, mask, layout)
    assert got.shape == (dy.shape[0], mask.shape[1]) and got.dtype == dy.dtype
    assert_close(got, expected("masked_linear_dx", dy, weight, mask, layout), reduction_length=mask.shape[0])


def check_dw(fns, dy, x, mask, layout):
    got = fns.masked_linear_dw(dy, x, mask, layout)
    assert got.shape == mask.shape and got.dtype == dy.dtype
    assert (got[~mask] == 0).all(), "dW is not exactly 0 where the mask is false"
    assert_close(got, expected("masked_linear_dw", dy, x, mask, layout), reduction_length=max(1, dy.shape[0]))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(backend, case):
    fns = impl(backend)
    kind, bn, bk, m, with_bias = case
    x, weight, mask, bias, _, layout = make(kind, bn, bk, m)
    check_forward(fns, x, weight, mask, bias if with_bias else None, layout)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dx(backend, case):
    fns = impl(backend)
    kind, bn, bk, m, _ = case
    _, weight, mask, _, dy, layout = make(kind, bn, bk, m)
    check_dx(fns, dy, weight, mask, layout)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dw(backend, case):
    fns = impl(backend)
    kind, bn, bk, m, _ = case
    x, _, mask, _, dy, layout = make(kind, bn, bk, m)
    check_dw(fns, dy, x, mask, layout)


@pytest.mark.parametrize("kind", ["tiles", "random-0.05", "empty"])
def test_dw_large_fresh_output(kind):
    """A dW of >= 16 MiB (the CPU kernel maps it fresh and writes only the tiles, relying on the OS's zeroed pages):
    equal to the reference, exactly 0 off the mask, and an ordinary tensor afterwards (in-place ops, accumulation
    into a .grad, freed and remapped by the next call without stale values)."""
    fns = impl("cpu")
    n, k = 2048 + 17, 2048 + 5  # > 16 MiB in fp32, clipped edge tiles
    for _ in range(2):  # the second call may reuse the first one's address range: still zeros off the tiles
        x, _, mask, _, dy, layout = make(kind, 32, 32, 3, n=n, k=k)
        check_dw(fns, dy, x, mask, layout)
    got = fns.masked_linear_dw(dy, x, mask, layout)
    got.mul_(2).add_(1)
    assert (got[~mask] == 1).all()
    w = torch.nn.Parameter(torch.zeros(n, k))
    w.grad = got
    w.grad += fns.masked_linear_dw(dy, x, mask, layout)
    del got, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("garbage", ["all", "sparse"])
def test_dw_recycled_output_is_cleared(dtype, garbage):
    """A freed large dW goes back to a pool and backs the next one (no page faults, no zeroing by the OS): whatever
    its owner left in it (NaN, -0.0, values everywhere, or one stray value per KiB), the next dW, for another mask,
    equals the reference and holds exactly +0.0 off its mask. The second call must reuse the first one's memory, or
    this test checks nothing."""
    fns = impl("cpu")
    n, k = 2048 + 17, 2048 + 5  # > 16 MiB
    x, _, mask, _, dy, layout = make("tiles", 32, 32, 3, n=n, k=k)
    first = fns.masked_linear_dw(dy.to(dtype), x.to(dtype), mask, layout)
    flat = first.view(-1)
    if garbage == "all":
        flat.fill_(float("nan"))
        flat[::3] = -0.0
        flat[1::3] = 7.0
    else:
        flat[::293] = -0.0
        flat[5::1031] = 3.0
        flat[-1] = float("nan")
    ptr = first.data_ptr()
    del first, flat
    x, _, mask, _, dy, layout = make("random-0.05", 32, 32, 3, n=n, k=k)
    got = fns.masked_linear_dw(dy.to(dtype), x.to(dtype), mask, layout)
    assert got.data_ptr() == ptr
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    assert (got[~mask].view(bits) == 0).all()
    want = ref.masked_linear_dw(dy.double(), x.double(), mask)
    assert_close(got, want.to(dtype), reduction_length=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_dtypes(backend, dtype):
    """bf16/fp16 (and float64 where the backend takes it): results in the input dtype, accumulated wide."""
    fns = impl(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels refuse float64 (test_bad_inputs_name_the_argument checks the TypeError)")
    for kind, bn, bk, m in (("tiles", 16, 16, 33), ("random-0.3", 32, 64, 7), ("full", 64, 16, 1)):
        x, weight, mask, bias, dy, layout = make(kind, bn, bk, m, dtype)
        check_forward(fns, x, weight, mask, bias, layout)
        check_dx(fns, dy, weight, mask, layout)
        check_dw(fns, dy, x, mask, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_in_masked_weights_are_ignored(backend):
    fns = impl(backend)
    for bn, bk in ((16, 16), (32, 64)):
        x, weight, mask, bias, dy, layout = make("tiles", bn, bk, 7)
        special = torch.tensor([float("nan"), float("inf"), float("-inf")])
        weight[~mask] = special[torch.arange(int((~mask).sum())) % 3]
        y = fns.masked_linear(x, weight, mask, bias, layout)
        dx = fns.masked_linear_dx(dy, weight, mask, layout)
        assert y.isfinite().all() and dx.isfinite().all()
        check_forward(fns, x, weight, mask, bias, layout)
        check_dx(fns, dy, weight, mask, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    """M = 0: empty y and dx, and a dW of exact zeros."""
    fns = impl(backend)
    x, weight, mask, bias, dy, layout = make("tiles", 16, 16, 0)
    for b in (bias, None):
        y = fns.masked_linear(x, weight, mask, b, layout)
        assert y.shape == (0, N) and y.dtype == x.dtype
    dx = fns.masked_linear_dx(dy, weight, mask, layout)
    assert dx.shape == (0, K) and dx.dtype == dy.dtype
    dw = fns.masked_linear_dw(dy, x, mask, layout)
    assert dw.shape == (N, K) and dw.dtype == dy.dtype and (dw == 0).all()


def test_bad_inputs_name_the_argument():
    fns = impl("triton")
    x, weight, mask, bias, dy, layout = make("tiles", 16, 16, 7)
    with pytest.raises(ValueError, match="mask"):
        fns.masked_linear(x, weight, torch.ones(N + 1, K, dtype=torch.bool), bias, layout)
    with pytest.raises(TypeError, match="mask"):
        fns.masked_linear(x, weight, mask.float(), bias, layout)
    with pytest.raises(TypeError, match="mask"):
        fns.masked_linear_dw(dy, x, mask.to(torch.uint8), layout)
    with pytest.raises(ValueError, match="x has 46 features"):
        fns.masked_linear(torch.randn(7, K + 1), weight, mask, bias, layout)
    with pytest.raises(ValueError, match="dy has 71 features"):
        fns.masked_linear_dx(torch.randn(7, N + 1), weight, mask, layout)
    with pytest.raises(ValueError, match="masked_linear_dw: x must have shape"):
        fns.masked_linear_dw(dy, torch.randn(8, K), mask, layout)
    with pytest.raises(ValueError, match="weight must have shape"):
        fns.masked_linear(x, weight[:, :-1].contiguous(), mask, bias, layout)
    with pytest.raises(ValueError, match="bias must have shape"):
        fns.masked_linear(x, weight, mask, bias[:-1], layout)
    with pytest.raises(TypeError, match="weight must be torch.float32"):
        fns.masked_linear(x, weight.bfloat16(), mask, bias, layout)
    with pytest.raises(TypeError, match="float64"):
        fns.masked_linear(x.double(), weight.double(), mask, bias.double(), layout)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        fns.masked_linear(x.int(), weight, mask, bias, layout)
    with pytest.raises(ValueError, match="x must be contiguous"):
        fns.masked_linear(torch.randn(K, 7).t(), weight, mask, bias, layout)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        fns.masked_linear_dx(dy, torch.randn(K, N).t(), mask, layout)
    with pytest.raises(ValueError, match="layout is for"):
        fns.masked_linear(x, weight, mask, bias, BlockLayout(torch.ones(N, K + 3, dtype=torch.bool), 16, 16))
    with pytest.raises(ValueError, match="layout blocks"):
        fns.masked_linear(x, weight, mask, bias, BlockLayout(mask, 8, 16))
    with pytest.raises(TypeError, match="layout must be"):
        fns.masked_linear(x, weight, mask, bias, None)
    with pytest.raises(ValueError, match="2-D"):
        fns.masked_linear(x[0], weight, mask, bias, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_split_k_decode(dtype):
    """The Triton forward's split-K path (M <= DECODE_ROWS): M in {1, 2, 3, 7, 16}, odd N and K, empty, full and
    mixed block rows (the "tiles" mask), the partials of every split summed once."""
    fns = impl("triton")
    from nnopt.kernels import masked_linear as tk

    assert tk.DECODE_ROWS == 16
    for i, m in enumerate((1, 2, 3, 7, 16)):
        x, weight, mask, bias, _, layout = make("tiles", 16, 16, m, dtype, n=47, k=53)
        mask[:16] = False  # block row 0 empty
        mask[16:32] = True  # block row 1 full
        layout = BlockLayout(mask, 16, 16)
        check_forward(fns, x, weight, mask, bias if i % 2 else None, layout)


@pytest.mark.gpu
class TestCuda:
    """The Triton kernels compiled on CUDA (skipped without a device): bf16, fp16 and fp32 ("ieee") forward, dx and
    dW against the float64 reference for every block size 16..128 (the per-GPU launch table's entries), shapes that
    are multiples of no tile (edge tiles clipped, BLOCK_M tiles with a ragged end), mixed empty/full/partial and
    random masks with NaN in the masked weights, exact zeros of dW outside the mask, M = 0, and 64-bit offsets (an
    x of more than 2**31 elements)."""

    SHAPE = (300, 200, 390)  # M, N, K
    BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (16, 128), (128, 32)]

    @pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
    def test_matches_reference(self, dtype, blocks):
        fns = impl("triton", "cuda")
        m, n, k = self.SHAPE
        for kind in ("tiles", "random-0.3", "corner"):
            x, weight, mask, bias, dy, layout = make(kind, *blocks, m, dtype, "cuda", n, k)
            weight[~mask] = float("nan")
            check_forward(fns, x, weight, mask, bias, layout)
            check_forward(fns, x, weight, mask, None, layout)
            check_dx(fns, dy, weight, mask, layout)
            check_dw(fns, dy, x, mask, layout)
        for m_decode in (1, 16):  # the split-K forward
            x, weight, mask, bias, _, layout = make("tiles", *blocks, m_decode, dtype, "cuda", n, k)
            weight[~mask] = float("nan")
            check_forward(fns, x, weight, mask, bias, layout)
        x, weight, mask, bias, dy, layout = make("tiles", *blocks, 0, dtype, "cuda", n, k)
        assert fns.masked_linear(x, weight, mask, bias, layout).shape == (0, n)
        assert (fns.masked_linear_dw(dy, x, mask, layout) == 0).all()

    def test_more_than_2_31_elements(self):
        """x [M, 1024] bf16 with M * 1024 > 2**31 (~4.3 GB): the rows past the 32-bit range are right."""
        fns = impl("triton", "cuda")
        n, k = 64, 1024
        m = 2**31 // k + 70
        mask = make_mask("tiles", n, k, 32, 64, "cuda")
        mask[:, -1] = True
        layout = BlockLayout(mask, 32, 64)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        tail = slice(m - 100, m)
        y = fns.masked_linear(x, weight, mask, None, layout)
        assert_close(y[tail], expected("masked_linear", x[tail], weight, mask, None), reduction_length=k)
        del y
        dx = fns.masked_linear_dx(dy, weight, mask, layout)
        assert_close(dx[tail], expected("masked_linear_dx", dy[tail], weight, mask), reduction_length=n)
        del dx
        dw = fns.masked_linear_dw(dy, x, mask, layout)
        want = ref.masked_linear_dw(dy.float(), x.float(), mask).to(torch.bfloat16)
        assert (dw[~mask] == 0).all()
        assert_close(dw, want, reduction_length=m)
