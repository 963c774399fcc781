"""Architecture transfer: clone_architecture, Net2Net widen/deepen preserve the function, narrow changes it only as
reported and keeps the most important units; bad input."""

import collections

import pytest
import torch
from torch import nn

from nnopt import sparsity
from nnopt.prune._contract import pruned_names
from nnopt.prune.methods import l1_unstructured
from nnopt.transfer.architecture import (
    DeepenReport,
    NarrowReport,
    WidenReport,
    clone_architecture,
    deepen,
    narrow,
    widen,
)

ATOL = 1e-5  # the bar the issue sets for function-preserving growth: max abs difference on random inputs, eval


def _randomize(model):
    """Nonzero biases, non-trivial BatchNorm statistics and affine parameters, so replicated entries matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)
    return model.eval()


def mlp():
    return _randomize(nn.Sequential(
        nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(10, 8), nn.Tanh(),
        nn.Sequential(nn.Linear(8, 7), nn.PReLU(7), nn.Dropout(0.2)),
        nn.Linear(7, 3)))


def _same_function(model, change, x=None):
    x = torch.randn(64, 6) if x is None else x
    with torch.no_grad():
        before = model(x)
    report = change(model)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert (after - before).abs().max().item() <= ATOL
    return report


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layer, width", [("0", 16), ("4", 12), ("6.0", 11)])
def test_widen_preserves_the_function(layer, width):
    model = mlp()
    report = _same_function(model, lambda m: widen(m, layer, width))
    assert isinstance(report, WidenReport)
    lin = model.get_submodule(layer)
    assert type(lin) is nn.Linear and lin.out_features == width
    assert (report.old_width, report.new_width, len(report.replicated)) == (lin.out_features - len(
        report.replicated), width, width - report.old_width)
    assert report.max_abs_deviation <= ATOL and report.noise == 0
    assert all(0 <= g < report.old_width for g in report.replicated)


def test_widen_replicates_units_and_divides_outgoing_weights():
    model = mlp()
    old0, old1, old4 = model[0], model[1], model[4]
    report = widen(model, model[0], 14, generator=torch.Generator().manual_seed(3))
    assert (report.layer, report.next, report.through) == ("0", "4", ["1", "2", "3"])
    g = list(range(10)) + report.replicated
    counts = collections.Counter(g)
    assert torch.equal(model[0].weight, old0.weight[g]) and torch.equal(model[0].bias, old0.bias[g])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(model[1], name), getattr(old1, name)[g])
    scale = torch.tensor([1.0 / counts[i] for i in g])
    torch.testing.assert_close(model[4].weight, old4.weight[:, g] * scale, rtol=0, atol=0)
    assert torch.equal(model[4].bias, old4.bias)
    assert model[1].num_features == 14 and model[4].in_features == 14
    assert model[0].weight.dtype == old0.weight.dtype and model[0].weight.requires_grad


def test_widen_float64_and_training_flags():
    model = mlp().double()
    model[3].train()  # dropout in training mode: probes still run in eval mode
    report = widen(model, "0", 13)
    assert model[0].weight.dtype == torch.float64 and model[1].running_mean.dtype == torch.float64
    assert report.max_abs_deviation <= ATOL
    assert model[3].training and not model[1].training


def test_widen_with_noise_reports_the_deviation():
    model = mlp()
    x = torch.randn(32, 6)
    with torch.no_grad():
        before = model(x)
    report = widen(model, "0", 16, noise=0.5, probe=x)
    with torch.no_grad():
        after = model(x)
    assert report.max_abs_deviation > 0
    assert report.max_abs_deviation == pytest.approx((after - before).abs().max().item(), rel=1e-6)
    assert "noise 0.5" in str(report)
    local = widen(mlp(), "0", 16, noise=0.5)  # no probe: measured on the changed chain
    assert local.max_abs_deviation > 0 and "random" in local.probe


def test_widen_carries_masks():
    model = mlp()
    l1_unstructured(model[0], "weight", 0.5)
    l1_unstructured(model[4], "weight", 0.5)
    m0, m4 = model[0].weight_mask.clone(), model[4].weight_mask.clone()
    report = _same_function(model, lambda m: widen(m, "0", 13))
    g = list(range(10)) + report.replicated
    assert pruned_names(model[0]) == ["weight"] and torch.equal(model[0].weight_mask, m0[g])
    assert torch.equal(model[4].weight_mask, m4[:, g])
    assert sparsity.get_mask(model[4].weight) is model[4].weight_mask
    assert (model[0].weight[~model[0].weight_mask] == 0).all()


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.7), nn.Identity()])
def test_deepen_preserves_the_function(act):
    model = _randomize(nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), act, nn.Dropout(0.2), nn.Linear(9, 3)))
    report = _same_function(model, lambda m: deepen(m, after="0"))
    assert isinstance(report, DeepenReport)
    assert report.inserted == ["3", "4"] and report.renamed == {"3": "5", "4": "6"}
    assert type(model[3]) is nn.Linear and torch.equal(model[3].weight, torch.eye(9))
    assert torch.equal(model[3].bias, torch.zeros(9))
    assert type(model[4]) is type(act) and model[4] is not act
    assert report.max_abs_deviation == 0


def test_deepen_nested_and_named_sequentials():
    inner = nn.Sequential(collections.OrderedDict(fc=nn.Linear(8, 7), act=nn.ReLU()))
    model = _randomize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), inner, nn.Linear(7, 3)))
    report = _same_function(model, lambda m: deepen(m, inner.fc))
    assert report.inserted == ["2.act_deepen0", "2.act_deepen1"] and report.renamed == {}
    assert list(inner._modules) == ["fc", "act", "act_deepen0", "act_deepen1"]
    # the activation may sit in the enclosing Sequential
    model = _randomize(nn.Sequential(nn.Sequential(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 3)))
    report = _same_function(model, lambda m: deepen(m, "0.0"))
    assert report.inserted == ["2", "3"]


@pytest.mark.parametrize("act", [nn.Tanh(), nn.GELU(), nn.Sigmoid(), nn.LeakyReLU(0.1), nn.SiLU()])
def test_deepen_refuses_activations_that_are_not_idempotent(act):
    model = nn.Sequential(nn.Linear(6, 9), act, nn.Linear(9, 3))
    with pytest.raises(ValueError, match=f"{type(act).__name__}.*not idempotent"):
        deepen(model, "0")
    assert len(model) == 3


def test_narrow_keeps_the_most_important_units():
    model = mlp()
    with torch.no_grad():
        norms = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5])
        model[0].weight.copy_(model[0].weight / model[0].weight.abs().sum(1, keepdim=True) * norms[:, None])
    old0, old1, old4 = model[0], model[1], model[4]
    report = narrow(model, "0", 4, importance="l1")
    assert isinstance(report, NarrowReport)
    assert report.kept == [2, 4, 6, 8] and report.removed == [0, 1, 3, 5, 7, 9]
    assert report.removed_scores == pytest.approx(norms[report.removed].tolist(), rel=1e-6)
    keep = report.kept
    assert torch.equal(model[0].weight, old0.weight[keep]) and torch.equal(model[0].bias, old0.bias[keep])
    assert torch.equal(model[1].running_var, old1.running_var[keep]) and model[1].num_features == 4
    assert torch.equal(model[4].weight, old4.weight[:, keep]) and torch.equal(model[4].bias, old4.bias)


def test_narrow_changes_the_function_only_as_reported():
    model = mlp()
    x = torch.randn(32, 6)
    untouched = {k: v for k, v in _params(model).items() if not k.startswith(("4.", "6.0."))}
    with torch.no_grad():
        before = model(x)
    report = narrow(model, "4", 5, importance="l2", probe=x)
    with torch.no_grad():
        after = model(x)
    assert report.max_abs_deviation == pytest.approx((after - before).abs().max().item(), rel=1e-6)
    assert report.max_abs_deviation > 0
    for k, v in untouched.items():
        assert torch.equal(model.state_dict()[k], v)
    # without a probe: measured on the chain 4 -> 5 -> 6.0 alone
    local = narrow(mlp(), "4", 5, importance="l2")
    assert local.max_abs_deviation > 0 and "6.0" in local.probe and local.next == "6.0"


def test_narrow_with_masks_random_and_callable_importance():
    model = mlp()
    l1_unstructured(model[6][0], "weight", 0.3)
    mask = model[6][0].weight_mask.clone()
    report = narrow(model, "6.0", 4, importance=lambda lin: torch.arange(lin.out_features, dtype=torch.float))
    assert report.kept == [3, 4, 5, 6] and report.importance == "<lambda>"
    assert torch.equal(model[6][0].weight_mask, mask[[3, 4, 5, 6]])
    assert model[6][1].num_parameters == 4 and model[7].in_features == 4
    gen = torch.Generator().manual_seed(1)
    a = narrow(mlp(), "0", 5, importance="random", generator=gen).kept
    b = narrow(mlp(), "0", 5, importance="random", generator=torch.Generator().manual_seed(1)).kept
    assert a == b and len(a) == 5


def test_clone_architecture_copy_and_reset():
    model = mlp()
    l1_unstructured(model[0], "weight", 0.5)
    copy_ = clone_architecture(model, init="copy")
    assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), model.state_dict().values()))
    assert sparsity.get_mask(copy_[0].weight) is copy_[0].weight_mask
    assert copy_[0].weight is not model[0].weight

    fresh = clone_architecture(model)  # init="reset"
    assert pruned_names(fresh[0]) == [] and "0.weight_mask" not in fresh.state_dict()
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in model.named_parameters()]
    for (name, p), q in zip(fresh.named_parameters(), model.parameters()):
        assert not torch.equal(p, q) or name in ("1.weight", "1.bias"), name  # BatchNorm resets to 1 / 0
    assert torch.equal(fresh[1].running_var, torch.ones(10)) and torch.equal(fresh[1].weight, torch.ones(10))
    assert (fresh[0].weight != 0).all()  # dense again
    assert torch.equal(model[0].weight_mask.float().mean(), torch.tensor(0.5))  # the original is untouched


class Custom(nn.Module):
    """A parameter no initialiser writes, and a constant buffer that is part of the architecture."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.full((1, 4), 3.0))
        self.register_buffer("table", torch.arange(4.0))
        self.fc = nn.Linear(4, 4)


def test_clone_reset_fallback_and_constant_buffers():
    fresh = clone_architecture(Custom())
    assert not torch.isnan(fresh.token).any() and not (fresh.token == 3.0).any()
    assert torch.equal(fresh.table, torch.arange(4.0))
    assert not torch.isnan(fresh.fc.weight).any()


def test_bad_inputs():
    model = mlp()
    with pytest.raises(ValueError, match="new_width=10 must be larger"):
        widen(model, "0", 10)
    with pytest.raises(ValueError, match="new_width=4 must be larger"):
        widen(model, "0", 4)
    with pytest.raises(ValueError, match="new_width=12 must be in"):
        narrow(model, "0", 12)
    with pytest.raises(ValueError, match="new_width=10 must be in"):
        narrow(model, "0", 10)
    with pytest.raises(TypeError, match="new_width must be an int"):
        widen(model, "0", 12.0)
    for fn in (lambda: widen(model, "encoder.9", 20), lambda: narrow(model, "encoder.9", 2),
               lambda: deepen(model, "encoder.9")):
        with pytest.raises(ValueError, match="no layer named 'encoder.9'"):
            fn()
    with pytest.raises(ValueError, match="is a BatchNorm1d; expected an nn.Linear"):
        widen(model, "1", 20)
    with pytest.raises(ValueError, match="expected per-feature modules .* the chain ends"):
        widen(model, "7", 20)  # the last layer: nothing to absorb the new units
    with pytest.raises(ValueError, match="noise must be"):
        widen(model, "0", 12, noise=-1)
    with pytest.raises(ValueError, match="importance must be one of"):
        narrow(model, "0", 5, importance="l3")
    with pytest.raises(ValueError, match="one score per output unit"):
        narrow(model, "0", 5, importance=lambda lin: torch.ones(3))
    with pytest.raises(ValueError, match="init must be"):
        clone_architecture(model, init="zeros")
    with pytest.raises(ValueError, match="expected an activation after '7'"):
        deepen(model, "7")
    with pytest.raises(ValueError, match="not a submodule"):
        widen(model, nn.Linear(2, 2), 4)
    assert model[0].out_features == 10 and len(model) == 8  # nothing changed by the failed calls


def test_chains_that_cannot_be_followed():
    ln = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="found '1': LayerNorm is not a per-feature module"):
        widen(ln, "0", 10)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(ValueError, match="not a child of an nn.Sequential"):
        widen(Block(), "fc1", 10)
    shared = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="used at 2 places"):
        widen(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared), "0", 10)
