"""SparseGPT's calibration Hessian on bf16 matrix units (issue 14): the split kernel against its float64 oracle,
the portable path, accuracy against float32 accumulation, the default's masks, bad input."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import nnopt.prune as prune
from nnopt import backends
from nnopt.prune.oneshot import Stats, split_hessian_available
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available
from tests.prune.test_oneshot import correlated_inputs

# (2500, 100): several token chunks of the AMX kernel with blocks strictly above the diagonal (accumulated in h
# itself) and edge blocks.
SHAPES = [(1, 1), (70, 45), (64, 96), (333, 130), (2048 + 17, 33), (2500, 100)]


@pytest.mark.parametrize("tokens,k", SHAPES)
@pytest.mark.parametrize("terms", [1, 3])
def test_kernel_equals_reference(tokens, k, terms):
    """cpu (AMX tiles here, else float32 GEMMs) against the float64 oracle: upper triangle added, lower untouched;
    x a non-contiguous view."""
    skip_unless_available("cpu", "cpu", "oneshot")
    x = torch.randn(k, tokens).t() * torch.exp(torch.randn(k))  # [tokens, k], column-major
    start = torch.randn(k, k)
    outs = {}
    for name in ("cpu", "torch"):
        h = start.clone()
        backends.implementation("oneshot", name).hessian_accumulate(h, x, terms)
        outs[name] = h
    assert torch.equal(outs["cpu"].tril(-1), start.tril(-1))
    assert_close(outs["cpu"], outs["torch"], reduction_length=tokens)


def test_portable_path_matches():
    """NNOPT_AMX=0 (the path CPUs without AMX take) gives the same sums, in a fresh process."""
    skip_unless_available("cpu", "cpu", "oneshot")
    code = ("import torch, nnopt.prune.oneshot as o; from nnopt.reference.oneshot import hessian_accumulate as r; "
            "from nnopt.testing import assert_close; o._amx_usable(); assert not o.split_hessian_available(); "
            "x = torch.randn(300, 70); h = torch.zeros(70, 70); g = torch.zeros(70, 70); "
            "torch.ops.nnopt.hessian_accumulate_(h, x, 3); r(g, x, 3); assert_close(h, g, reduction_length=300); "
            "s = o.Stats('hessian', 70, 'cpu', None); assert s.dtype == torch.float32")
    env = dict(os.environ, NNOPT_AMX="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))


def test_opcheck_and_bad_input():
    skip_unless_available("cpu", "cpu", "oneshot")
    op = torch.ops.nnopt.hessian_accumulate_
    torch.library.opcheck(op, (torch.zeros(40, 40), torch.randn(50, 40), 3))
    with pytest.raises(RuntimeError, match="hessian_accumulate_: h must be"):
        op(torch.zeros(40, 41), torch.randn(50, 40), 3)
    with pytest.raises(RuntimeError, match="hessian_accumulate_: x must be"):
        op(torch.zeros(40, 40), torch.randn(50, 40, dtype=torch.float64), 3)
    with pytest.raises(RuntimeError, match="hessian_accumulate_: terms must be"):
        op(torch.zeros(40, 40), torch.randn(50, 40), 2)
    with pytest.raises(ValueError, match="hessian_dtype='split' runs on CPU only"):
        Stats("hessian", 8, "meta", "split")
    with pytest.raises(ValueError, match="hessian_dtype must be"):
        prune.sparsegpt(nn.Sequential(nn.Linear(8, 8)), [torch.randn(4, 8)], 0.5, hessian_dtype="bf16")


def _hessians(x, batches):
    out = {}
    for dtype in ("split", torch.float32, torch.bfloat16):
        s = Stats("hessian", x.shape[1], "cpu", dtype)
        for chunk in x.chunk(batches):
            s.add(chunk)
        out[dtype] = s.finish()
    return out


def test_split_is_float32_class():
    """Relative Frobenius error against float64 on outlier-heavy inputs: split within 20x of float32 accumulation
    (both ~1e-7..1e-6) and far below bf16 inputs'; symmetric."""
    skip_unless_available("cpu", "cpu", "oneshot")
    x = correlated_inputs(8192, 200)
    x[:, :3] *= 30  # a few large-magnitude channels, as in LLMs
    exact = x.double().T @ x.double()
    hs = _hessians(x, 4)
    err = {d: float((h.double() - exact).norm() / exact.norm()) for d, h in hs.items()}
    assert torch.equal(hs["split"], hs["split"].T)
    assert err["split"] < 20 * max(err[torch.float32], 1e-7)
    assert err["split"] < err[torch.bfloat16] / 10


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_default_masks_equal_float32(pattern, sparsity):
    """SparseGPT with the default Hessian (split where AMX is usable) keeps the float32 Hessian's masks and its
    reconstruction; hessian_dtype=torch.float32 is the exact opt-out."""
    torch.manual_seed(0)
    x = correlated_inputs(4096, 128)
    base = nn.Linear(128, 64, bias=False)
    models = {}
    for dtype in (None, torch.float32):
        m = nn.Sequential(nn.Linear(128, 64, bias=False))
        m[0].weight.data.copy_(base.weight)
        prune.sparsegpt(m, list(x.split(1024)), sparsity, pattern=pattern, hessian_dtype=dtype)
        models[dtype] = m
    assert torch.equal(models[None][0].weight_mask, models[torch.float32][0].weight_mask)
    # Same masks; the compensated weights within 1e-4 of the weights' scale (float32 accumulation of the
    # damped inverse amplifies the ~1e-6 Hessian differences a little).
    torch.testing.assert_close(models[None][0].weight.detach(), models[torch.float32][0].weight.detach(),
                               rtol=1e-3, atol=1e-4 * float(base.weight.detach().abs().max()))
    assert Stats("hessian", 8, "cpu", None).dtype == ("split" if split_hessian_available() else torch.float32)
