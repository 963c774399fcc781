"""nnopt::kept_gather / kept_scatter_ (csrc/cpu/kept_gather.cpp), the CPU ops that move compact optimizer states'
kept entries, against their oracle: torch.masked_select and Tensor.masked_scatter_.

Sizes cross the 16- and 8-lane vector steps and the 64 Ki-element work chunks; element sizes 1, 2, 4 and 8 bytes;
masks empty, full, random and in runs. A scatter must write only the kept entries."""

import pytest
import torch

import nnopt._ext as ext

pytestmark = pytest.mark.skipif(not ext.has_kernel("kept_gather", "CPU"), reason="nnopt._C is not built here")
ops = torch.ops.nnopt

SIZES = [0, 1, 7, 16, 17, 1000, 3 * 65536 + 5, 1 << 20]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.int64]


def make_mask(kind, n):
    if kind == "empty":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "full":
        return torch.ones(n, dtype=torch.bool)
    if kind == "runs":  # long kept and pruned runs: whole vectors of either
        return (torch.arange(n) // 37) % 3 == 0
    return torch.rand(n) < 0.1


def values(n, dtype):
    if dtype.is_floating_point:
        return torch.randn(n).to(dtype)
    return torch.randint(0, 100, (n,)).to(dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["random", "runs", "empty", "full"])
def test_gather_and_scatter_match_masked_select_and_scatter(n, kind):
    mask = make_mask(kind, n)
    for dtype in DTYPES:
        x, y = values(n, dtype), values(n, dtype)
        a, b = ops.kept_gather(mask, [x, y])
        assert torch.equal(a, x.masked_select(mask)) and torch.equal(b, y.masked_select(mask)), dtype
        dst = values(n, dtype)
        want = dst.clone().masked_scatter_(mask, b)
        ops.kept_scatter_(dst, mask, b)
        assert torch.equal(dst, want), dtype  # entries the mask drops keep their old values: not written


def test_shaped_tensors_read_in_row_major_order():
    mask = torch.rand(33, 65) < 0.3
    x = torch.randn(33, 65)
    (a,) = ops.kept_gather(mask, [x])
    assert torch.equal(a, x[mask])
    ops.kept_scatter_(x, mask, torch.zeros_like(a))
    assert (x[mask] == 0).all()


def test_bad_inputs_raise():
    mask, x = torch.rand(100) < 0.5, torch.randn(100)
    with pytest.raises(RuntimeError, match="expected bool"):
        ops.kept_gather(mask.to(torch.uint8), [x])
    with pytest.raises(RuntimeError, match="has 99 elements, expected 100"):
        ops.kept_gather(mask, [x[:99]])
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.kept_gather(mask, [torch.randn(100, 2)[:, 0]])
    (a,) = ops.kept_gather(mask, [x])
    with pytest.raises(RuntimeError, match="the mask keeps"):
        ops.kept_scatter_(x, mask, a[1:])
    with pytest.raises(RuntimeError, match="dtype"):
        ops.kept_scatter_(x, mask, a.double())


def test_opcheck():
    mask = torch.rand(50) < 0.5
    torch.library.opcheck(ops.kept_gather, (mask, [torch.randn(50), torch.randn(50)]),
                          test_utils=("test_schema", "test_faketensor"))
    k = int(mask.sum())
    torch.library.opcheck(ops.kept_scatter_, (torch.randn(50), mask, torch.randn(k)),
                          test_utils=("test_schema", "test_faketensor"))
