"""The mask registry: set/get/clear, pruned entries zeroed at once, and the documented errors."""

import pytest
import torch

from nnopt import sparsity


def test_set_get_clear():
    p = torch.nn.Parameter(torch.randn(4, 5))
    mask = torch.rand(4, 5) > 0.5
    assert sparsity.get_mask(p) is None
    assert sparsity.set_mask(p, mask) is mask
    assert sparsity.get_mask(p) is mask
    assert (p[~mask] == 0).all()
    sparsity.clear_mask(p)
    assert sparsity.get_mask(p) is None
    sparsity.clear_mask(p)  # clearing twice is fine


@pytest.mark.parametrize("mask,err,match", [
    (torch.ones(4, 5), TypeError, "torch.bool"),
    (torch.ones(5, 4, dtype=torch.bool), ValueError, "shape"),
    (torch.ones(4, 5, dtype=torch.bool, device="meta"), ValueError, "meta"),
    ([[True]], TypeError, "bool tensor"),
])
def test_bad_masks_raise(mask, err, match):
    with pytest.raises(err, match=match):
        sparsity.set_mask(torch.nn.Parameter(torch.randn(4, 5)), mask)


def test_complex_parameters_cannot_be_masked():
    with pytest.raises(TypeError, match="complex"):
        sparsity.set_mask(torch.randn(3, dtype=torch.complex64), torch.ones(3, dtype=torch.bool))
