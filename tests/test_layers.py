"""nnopt.layers: nn.Linear and transformers' Conv1D seen as one kind of layer, in the input-dimension convention."""

import pytest
import torch

from nnopt import layers

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def test_conv1d_is_a_transposed_linear():
    torch.manual_seed(0)
    conv, lin = Conv1D(7, 5), torch.nn.Linear(5, 7)
    assert layers.is_conv1d(conv) and not layers.is_conv1d(lin)
    assert layers.is_linear_like(conv) and layers.is_linear_like(lin)
    assert not layers.is_linear_like(torch.nn.Conv1d(5, 7, 1))
    assert layers.in_out_features(conv) == layers.in_out_features(lin) == (5, 7)
    assert (layers.in_dim(conv), layers.out_dim(conv), layers.in_dim(lin), layers.out_dim(lin)) == (0, 1, 1, 0)
    x = torch.randn(3, 5)
    torch.testing.assert_close(conv(x), torch.nn.functional.linear(x, layers.weight_as_linear(conv), conv.bias))
    with torch.no_grad():
        layers.weight_as_linear(conv)[2, 3] = 0.0   # a view: writes land in the parameter
    assert conv.weight[3, 2] == 0


def test_linear_modules_finds_both_in_order():
    model = torch.nn.Sequential(Conv1D(8, 4), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert [n for n, _ in layers.linear_modules(model)] == ["0", "2"]
