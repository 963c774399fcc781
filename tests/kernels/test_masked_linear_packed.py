"""The decode-shaped CPU kernels (nnopt::masked_linear_pack + nnopt::masked_linear_packed) against the reference.

M in {1, 2, 3, 7, 16} (and 20: more than one register block of rows), odd N and K that are multiples of no block
size, float32 / float64 / bfloat16 / float16, masks with empty and full block rows beside partly filled tiles, and
block sizes whose sides are not multiples of the panels' rounding (17 × 5). Weights are nonzero (and NaN in one
test) where the mask is false. bfloat16 runs both on AVX512-BF16 dot products and on the widening path
(NNOPT_CPU_BF16_DOT=0), whichever this CPU has. Expected: the reference in float64, cast to the dtype under test,
within nnopt.testing's tolerance for a reduction of length K.
"""

import pytest
import torch

from nnopt.nn.layout import BlockLayout
from nnopt.reference import masked_linear as ref
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

pytestmark = pytest.mark.usefixtures("one_thread")

MS = [1, 2, 3, 7, 16, 20]
BLOCKS = [(32, 32), (16, 64), (17, 5)]


@pytest.fixture(autouse=True)
def _cpu_kernels():
    skip_unless_available("cpu", "cpu", "masked_linear")


def rows_mask(n, k, bn, bk, seed=0):
    """Block row 0 empty, block row 1 entirely true, the rest random tiles (empty, full or half filled)."""
    gen = torch.Generator().manual_seed(seed)
    nb, kb = -(-n // bn), -(-k // bk)
    choice = torch.randint(0, 3, (nb, kb), generator=gen).repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    half = torch.rand(nb * bn, kb * bk, generator=gen) < 0.5
    mask = ((choice == 1) | ((choice == 2) & half))[:n, :k].clone()
    mask[:bn] = False
    mask[bn:2 * bn] = True
    return mask


def pack_and_run(x, weight, mask, bias, bn, bk, dtype=None):
    lay = BlockLayout(mask, bn, bk)
    ops = torch.ops.nnopt
    packed = ops.masked_linear_pack(weight, mask, lay.row_ptr, lay.col_idx, lay.full, bn, bk, dtype)
    return ops.masked_linear_packed(x, packed, bias, lay.row_ptr, lay.col_idx, mask.shape[0], bn, bk)


def expected(x, weight, mask, bias):
    b = bias.double() if bias is not None else None
    return ref.masked_linear(x.double(), weight.double(), mask, b)


# (dtype, NNOPT_CPU_BF16_DOT): bfloat16 on both of its kernels
KINDS = [(torch.float32, "1"), (torch.float64, "1"), (torch.float16, "1"), (torch.bfloat16, "1"), (torch.bfloat16, "0")]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype,bf16_dot", KINDS, ids=lambda v: str(v).replace("torch.", ""))
def test_packed_matches_reference(dtype, bf16_dot, block, monkeypatch):
    monkeypatch.setenv("NNOPT_CPU_BF16_DOT", bf16_dot)
    bn, bk = block
    n, k = 71, 93
    mask = rows_mask(n, k, bn, bk)
    weight = torch.randn(n, k).to(dtype)
    for i, m in enumerate(MS):
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n).to(dtype) if i % 2 else None
        y = pack_and_run(x, weight, mask, bias, bn, bk)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close(y, expected(x, weight, mask, bias).to(dtype), reduction_length=k, msg=f"M={m}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_at_batch_sized_m(dtype, threads):
    """Batch-sized M (200 rows: 25 register blocks of rows over every block row, the inference path up to
    dispatch.PACKED_ROWS) on one and two threads equals the reference."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, k, m = 70, 1536, 200
        mask = rows_mask(n, k, 32, 32, seed=3)
        weight, x, bias = torch.randn(n, k).to(dtype), torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
        y = pack_and_run(x, weight, mask, bias, 32, 32)
        assert_close(y, expected(x, weight, mask, bias).to(dtype), reduction_length=k)
    finally:
        torch.set_num_threads(prev)


def test_packed_in_another_dtype_matches_autocast():
    """Panels packed from float32 weights in bfloat16 / float16 (autocast's inference path)."""
    n, k = 64, 96
    mask = rows_mask(n, k, 32, 32)
    weight, bias = torch.randn(n, k), torch.randn(n)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(5, k).to(dtype)
        y = pack_and_run(x, weight, mask, bias.to(dtype), 32, 32, dtype)
        want = expected(x, weight.to(dtype), mask, bias.to(dtype)).to(dtype)
        assert_close(y, want, reduction_length=k)


def test_masked_nan_weights_are_ignored_and_empty_masks_give_the_bias():
    n, k = 40, 50
    mask = rows_mask(n, k, 16, 16)
    weight = torch.randn(n, k).masked_fill(~mask, float("nan"))
    x, bias = torch.randn(3, k), torch.randn(n)
    y = pack_and_run(x, weight, mask, bias, 16, 16)
    assert torch.isfinite(y).all()
    assert_close(y, expected(x, weight.nan_to_num(), mask, bias).float(), reduction_length=k)
    empty = torch.zeros(n, k, dtype=torch.bool)
    assert torch.equal(pack_and_run(x, weight, empty, bias, 16, 16), bias.expand(3, n))


def test_opcheck_pack_and_packed():
    mask = rows_mask(40, 48, 16, 16)
    lay = BlockLayout(mask, 16, 16)
    w, x, b = torch.randn(40, 48), torch.randn(3, 48), torch.randn(40)
    ops = torch.ops.nnopt
    torch.library.opcheck(ops.masked_linear_pack, (w, mask, lay.row_ptr, lay.col_idx, lay.full, 16, 16),
                          dict(dtype=torch.bfloat16))
    packed = ops.masked_linear_pack(w, mask, lay.row_ptr, lay.col_idx, lay.full, 16, 16)
    torch.library.opcheck(ops.masked_linear_packed, (x, packed, b, lay.row_ptr, lay.col_idx, 40, 16, 16))


def test_bad_input_names_the_op_and_argument():
    mask = rows_mask(40, 48, 16, 16)
    lay = BlockLayout(mask, 16, 16)
    w, x = torch.randn(40, 48), torch.randn(3, 48)
    ops = torch.ops.nnopt
    packed = ops.masked_linear_pack(w, mask, lay.row_ptr, lay.col_idx, lay.full, 16, 16)
    with pytest.raises(RuntimeError, match="masked_linear_pack: mask must have shape"):
        ops.masked_linear_pack(w, mask.t().contiguous(), lay.row_ptr, lay.col_idx, lay.full, 16, 16)
    with pytest.raises(RuntimeError, match="masked_linear_pack: mask must be bool"):
        ops.masked_linear_pack(w, mask.float(), lay.row_ptr, lay.col_idx, lay.full, 16, 16)
    with pytest.raises(RuntimeError, match="masked_linear_packed: packed must be of x's dtype"):
        ops.masked_linear_packed(x.bfloat16(), packed, None, lay.row_ptr, lay.col_idx, 40, 16, 16)
    with pytest.raises(RuntimeError, match="masked_linear_packed: packed has"):
        ops.masked_linear_packed(x, packed[:-1], None, lay.row_ptr, lay.col_idx, 40, 16, 16)
    with pytest.raises(RuntimeError, match="masked_linear_packed: bias must have 40 entries"):
        ops.masked_linear_packed(x, packed, torch.randn(39), lay.row_ptr, lay.col_idx, 40, 16, 16)
    with pytest.raises(RuntimeError, match="masked_linear_pack: float64 weights pack only as float64"):
        ops.masked_linear_pack(w.double(), mask, lay.row_ptr, lay.col_idx, lay.full, 16, 16, torch.float32)
