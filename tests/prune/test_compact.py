"""compact(): structurally pruned neurons leave Linear chains, the function stays, unsupported layers are named."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnopt.prune._contract import current_mask
from nnopt.prune.compact import compact
from nnopt.prune.methods import l1_unstructured, ln_structured

ATOL = 1e-5  # the bar compact promises: max abs difference on random inputs, eval mode



def _randomize(model):
    """Nonzero biases and BatchNorm statistics, so folded constants and sliced statistics matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm1d) and m.track_running_stats:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.BatchNorm1d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _n(model):
    return sum(p.numel() for p in model.parameters())


def _check_same_function(model, in_features, run):
    model.eval()
    x = torch.randn(64, in_features)
    with torch.no_grad():
        before = model(x)
    report = run(model)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert (after - before).abs().max().item() <= ATOL
    return report


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Tanh])
def test_sequential_mlp_with_dropout_and_batchnorm(act):
    model = _randomize(nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32), act(), nn.Dropout(0.2),
        nn.Linear(32, 24), act(), nn.Dropout(0.1),
        nn.Linear(24, 8)))
    ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    ln_structured(model[4], "weight", amount=0.25, n=1, dim=0)
    before = _n(model)
    report = _check_same_function(model, 16, compact)
    assert (model[0].out_features, model[1].num_features, model[4].in_features) == (16, 16, 16)
    assert (model[4].out_features, model[7].in_features) == (18, 18)
    assert model[1].running_mean.shape == (16,) and model[1].weight.shape == (16,)
    # layer 0 loses 16 rows of 16 + bias 1 + BN's 2 per unit + 16 columns of layer 4; layer 4 loses 6 rows
    # of 16 (after compaction) + bias 1 + 6 columns of layer 7
    expected = before - 16 * (16 + 1 + 2 + 24) - 6 * (16 + 1 + 8)
    assert report.params_before == before and report.params_after == _n(model) == expected
    assert [c["layer"] for c in report.compacted] == ["0", "4"]
    assert report.compacted[0]["removed"] == 16 and report.compacted[0]["next"] == "4"
    assert report.left_alone == []
    assert "parameters" in str(report)


def test_batchnorm_without_running_stats_and_next_layer_without_bias():
    # BatchNorm without running statistics maps a constant feature to its beta; the next layer has no bias.
    model = _randomize(nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12, track_running_stats=False), nn.ReLU(),
                                     nn.Linear(12, 4, bias=False)))
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.0)  # ReLU passes the constants: the fold is nonzero
        # Dyadic biases: the batch mean of a constant feature is then exact; otherwise its rounding, divided by
        # sqrt(eps), is noise of ~1e-5 in the uncompacted model itself.
        model[0].bias.copy_(torch.randint(-4, 5, (12,)) / 8)
    ln_structured(model[0], "weight", amount=4, n=2, dim=0)
    _check_same_function(model, 8, compact)
    assert model[0].out_features == 8 and model[3].bias is not None


class Tree(nn.Module):
    """A plain module tree with functional activations and a nested Sequential."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.block = nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30))
        self.head = nn.ModuleDict({"out": nn.Linear(30, 5)})

    def forward(self, x):
        h = F.gelu(self.fc1(x.flatten(1)))
        h = torch.tanh(self.block(h)) * 2.0
        return self.head["out"](F.dropout(h, 0.3, self.training))


def test_plain_module_tree():
    model = _randomize(Tree())
    ln_structured(model.fc1, "weight", amount=0.5, n=2, dim=0)
    ln_structured(model.block[0], "weight", amount=0.4, n=float("inf"), dim=0)
    before = _n(model)
    report = _check_same_function(model, 10, compact)
    assert model.fc1.out_features == 10 and model.block[0].in_features == 10
    assert model.block[0].out_features == 18 and model.block[1].num_features == 18
    assert model.head["out"].in_features == 18
    assert {c["layer"] for c in report.compacted} == {"fc1", "block.0"}
    assert report.params_after < before and report.traced


def test_masks_are_sliced_and_keep_pruned_entries_zero():
    model = _randomize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)))
    ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    l1_unstructured(model[0], "weight", amount=0.3)  # unstructured zeros inside the surviving rows
    l1_unstructured(model[2], "weight", amount=0.5)
    _check_same_function(model, 8, compact)
    m0, m2 = current_mask(model[0], "weight"), current_mask(model[2], "weight")
    assert m0.shape == model[0].weight.shape and m2.shape == model[2].weight.shape
    assert int((~m0).sum()) > 0 and int((~m2).sum()) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(32, 8)).pow(2).sum().backward()
        opt.step()
    assert (model[0].weight[~m0] == 0).all() and (model[2].weight[~m2] == 0).all()


def test_unsupported_layers_are_left_alone_and_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.norm = nn.LayerNorm(16)
            self.b = nn.Linear(16, 16)
            self.c = nn.Linear(16, 16)
            self.conv = nn.Conv1d(1, 4, 3)
            self.last = nn.Linear(16, 6)

        def forward(self, x):
            h = self.b(self.norm(self.a(x)))  # a: LayerNorm is not per-feature
            h = h + self.c(h).relu()  # b: its output also feeds the residual
            h = h + self.conv(h.unsqueeze(1)).mean(1).sum(-1, keepdim=True)
            return self.last(h)  # last: outputs are the model's outputs

    model = _randomize(Net())
    for layer in (model.a, model.b, model.last):
        ln_structured(layer, "weight", amount=0.5, n=2, dim=0)
    ln_structured(model.conv, "weight", amount=0.5, n=2, dim=0)
    before = _n(model)
    report = _check_same_function(model, 8, compact)
    assert report.compacted == [] and report.params_after == before
    why = dict(report.left_alone)
    assert set(why) == {"a", "b", "conv", "last"}
    assert "LayerNorm" in why["a"] and "2 operations" in why["b"]
    assert "Conv1d" in why["conv"] and "model's outputs" in why["last"]
    assert "left alone: a" in str(report)


def test_torch_hooked_layer_is_left_alone():
    model = _randomize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    torch.nn.utils.prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    report = _check_same_function(model, 8, compact)
    assert report.compacted == []
    assert report.left_alone and report.left_alone[0][0] == "0" and "torch.nn.utils.prune" in report.left_alone[0][1]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh())
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
            h = h * 1.0
        return self.out(h)


def test_untraceable_model_falls_back_to_sequential_chains():
    model = _randomize(Untraceable())
    ln_structured(model.body[0], "weight", amount=0.5, n=2, dim=0)
    ln_structured(model.body[2], "weight", amount=0.5, n=2, dim=0)
    report = _check_same_function(model, 6, compact)
    assert not report.traced
    assert model.body[0].out_features == 6 and model.body[2].in_features == 6
    why = dict(report.left_alone)
    assert set(why) == {"body.2"} and "nn.Sequential" in why["body.2"]


def test_nothing_to_compact_and_bad_input():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    report = compact(model)
    assert report.compacted == [] and report.left_alone == [] and report.params_after == report.params_before
    with pytest.raises(TypeError, match="model"):
        compact("not a model")


class ScalarsAndPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.PReLU(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(2.0 * self.act(self.fc1(x) - 0.5))


def test_per_channel_prelu_and_scalar_arithmetic():
    model = _randomize(ScalarsAndPReLU())
    with torch.no_grad():
        model.act.weight.uniform_(0.1, 0.4)
    ln_structured(model.fc1, "weight", amount=0.5, n=1, dim=0)
    report = _check_same_function(model, 6, compact)
    assert model.fc1.out_features == 8 and model.act.weight.shape == (8,) and model.act.num_parameters == 8
    assert model.fc2.in_features == 8 and len(report.compacted[0]["through"]) == 3
