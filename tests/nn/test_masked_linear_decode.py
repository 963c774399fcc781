"""MaskedLinear and masked_linear at inference on CPU: the packed-panel path (nnopt::masked_linear_packed).

Inference calls (decode and prefill shapes) run on panels packed once and cached; they must give the reference's
result in every dtype and under autocast, build no autograd node, and repack exactly when the weight, mask, bias or
dtype changes (an optimizer step, set_mask, an in-place edit, autocast on/off).
"""

import pytest
import torch

import nnopt.nn as nnn
from nnopt.nn import dispatch
from nnopt.reference import masked_linear as ref
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cpu_kernels():
    skip_unless_available("cpu", "cpu", "masked_linear")


def tile_mask(n, k, block=16, keep=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.rand(-(-n // block), -(-k // block), generator=gen) < keep
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k].contiguous()


def layer(n=70, k=90, backend="cpu", dtype=torch.float32):
    return nnn.MaskedLinear(k, n, mask=tile_mask(n, k), block_size=(16, 16), backend=backend).to(dtype)


def expected(lay, x):
    return ref.masked_linear(x.double(), lay.weight.double(), lay.weight_mask, lay.bias.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("lead", [(1,), (2, 3), (16,), (1, 1, 7)], ids=str)
def test_inference_matches_reference(dtype, lead):
    lay = layer(dtype=dtype)
    x = torch.randn(*lead, 90).to(dtype)
    with torch.no_grad():
        y = lay(x)
    assert y.shape == (*lead, 70) and y.dtype == dtype and y.grad_fn is None
    assert lay._decode_plan[2][0] is not None  # the packed path ran
    assert_close(y, expected(lay, x).to(dtype), reduction_length=90)


def test_panels_are_packed_once_and_repacked_when_anything_changes():
    lay = layer()
    x = torch.randn(2, 90)
    with torch.no_grad():
        lay(x)
        first = lay._decode_plan
        lay(x)
        assert lay._decode_plan is first  # reused
    opt = torch.optim.SGD(lay.parameters(), lr=0.1)
    lay(torch.randn(40, 90)).sum().backward()  # a training step (more rows: the autograd path)
    opt.step()
    with torch.no_grad():
        y = lay(x)
        assert lay._decode_plan is not first
        assert_close(y, expected(lay, x).float(), reduction_length=90)
        second = lay._decode_plan
        lay.bias.add_(1.0)  # in place: its version changes
        y = lay(x)
        assert lay._decode_plan is not second
        assert_close(y, expected(lay, x).float(), reduction_length=90)
        lay.weight_mask[:16] = False  # an in-place mask edit re-zeroes the weight and repacks
        y = lay(x)
        assert (lay.weight[:16] == 0).all()
        assert_close(y, expected(lay, x).float(), reduction_length=90)
    lay.set_mask(tile_mask(70, 90, seed=3))
    with torch.no_grad():
        assert_close(lay(x), expected(lay, x).float(), reduction_length=90)


def test_grad_path_is_unchanged_and_takes_the_batch_kernels():
    lay = layer()
    x = torch.randn(3, 90, requires_grad=True)
    y = lay(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert (lay.weight.grad[~lay.weight_mask] == 0).all()
    assert lay._plan[1] is dispatch.backends.implementation("masked_linear", "cpu")
    with torch.no_grad():
        x = torch.randn(64, 90)
        y = lay(x)  # prefill-sized inference: packed too
        assert lay._decode_plan[1] == {64: True} and y.grad_fn is None
        lay(torch.randn(dispatch.PACKED_ROWS + 1, 90))  # more rows: the panel kernels
    assert lay._decode_plan[1] == {64: True}
    assert_close(y, expected(lay, x).float(), reduction_length=90)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_packs_in_the_autocast_dtype_like_linear(dtype):
    lay = layer()
    dense = torch.nn.Linear(90, 70)
    with torch.no_grad():
        dense.weight.copy_(lay.weight)
        dense.bias.copy_(lay.bias)
    x = torch.randn(4, 90)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y, want = lay(x), dense(x)
    assert y.dtype == want.dtype == dtype
    assert_close(y, want, reduction_length=90)
    with torch.no_grad():
        assert lay(x).dtype == torch.float32  # autocast off: repacked in float32


def test_functional_decode_path_caches_per_weight():
    skip_unless_available("cpu", "cpu", "masked_linear")
    w = torch.randn(70, 90)
    mask = tile_mask(70, 90)
    x = torch.randn(5, 90)
    y = nnn.functional.masked_linear(x, w, mask, None, "cpu")
    assert_close(y, ref.masked_linear(x.double(), w.double(), mask, None).float(), reduction_length=90)
    assert dispatch.choose(dispatch.cached_layout(mask, 32, 32), 5, w, "cpu", grad_needed=False) is dispatch.PACKED
    w.mul_(2.0)  # a new version: repacked
    y = nnn.functional.masked_linear(x, w, mask, None, "cpu")
    assert_close(y, ref.masked_linear(x.double(), w.double(), mask, None).float(), reduction_length=90)


def test_auto_takes_the_packed_path_only_where_it_pays():
    sparse = nnn.MaskedLinear(512, 512, mask=tile_mask(512, 512, 32, keep=0.1), block_size=(32, 32))
    dense = nnn.MaskedLinear(512, 512, mask=tile_mask(512, 512, 32, keep=0.95), block_size=(32, 32))
    x = torch.randn(1, 512)
    with torch.no_grad():
        for lay in (sparse, dense):
            assert_close(lay(x), expected(lay, x).float(), reduction_length=512)
    assert sparse._decode_plan[1] == {1: True} and sparse._decode_plan[2][0] is not None
    assert dense._decode_plan[1] == {1: False} and dense._decode_plan[2][0] is None  # dense F.linear, nothing packed
