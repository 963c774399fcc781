"""global_unstructured: torch's masks on tie-free weights across tensors of mixed sizes, without concatenation."""

import copy

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from nnopt import prune
from tests.prune._helpers import OPTIMIZERS, assert_unchanged, mlp, our_mask, pruned_entries_are_zero, snapshot, train


def _pairs(model):
    return [(m, n) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for n in ("weight", "bias")]


def _mixed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 1))


def _assert_same(ours, theirs):
    for (a, name), (b, _) in zip(_pairs(ours), _pairs(theirs)):
        assert torch.equal(our_mask(a, name), getattr(b, name + "_mask") != 0), name
        assert torch.equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.5, 0.9, 1.0, 0, 1, 333, 13 * 64 + 64 + 64 * 5 + 5 + 5 + 1])
def test_matches_torch(amount):
    ours = _mixed()
    theirs = copy.deepcopy(ours)
    prune.global_unstructured(_pairs(ours), prune.L1Unstructured, amount=amount)
    tprune.global_unstructured(_pairs(theirs), tprune.L1Unstructured, amount=amount)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("amounts", [[0.3, 0.3, 0.5], [100, 0.5, 7], [0.2, 0.0, 1.0]])
def test_repeated_matches_torch(amounts):
    ours = _mixed()
    theirs = copy.deepcopy(ours)
    # an earlier per-layer pruning counts too: the global amount is relative to what remains
    prune.ln_structured(ours[2], "weight", 1, n=2, dim=0)
    tprune.ln_structured(theirs[2], "weight", 1, n=2, dim=0)
    for amount in amounts:
        prune.global_unstructured(_pairs(ours), prune.L1Unstructured, amount=amount)
        tprune.global_unstructured(_pairs(theirs), tprune.L1Unstructured, amount=amount)
        _assert_same(ours, theirs)


def test_importance_scores_and_subset_match_torch():
    ours = _mixed()
    theirs = copy.deepcopy(ours)
    so = {(ours[0], "weight"): torch.randn(64, 13)}
    st = {(theirs[0], "weight"): so[(ours[0], "weight")]}
    po, pt = [(ours[0], "weight"), (ours[2], "weight")], [(theirs[0], "weight"), (theirs[2], "weight")]
    prune.global_unstructured(iter(po), prune.L1Unstructured, importance_scores=so, amount=0.4)
    tprune.global_unstructured(pt, tprune.L1Unstructured, importance_scores=st, amount=0.4)
    for (a, n), (b, _) in zip(po, pt):
        assert torch.equal(our_mask(a, n), getattr(b, n + "_mask") != 0)
    assert "bias_mask" not in ours[0]._buffers


def test_mixed_dtypes_and_ties_prune_exactly_k():
    a = nn.Linear(10, 10).double()
    b = nn.Linear(10, 7).half()
    with torch.no_grad():
        a.weight[:5] = 0.25  # 50 ties
        b.weight[:3] = -0.25  # 30 more at the same magnitude
    prune.global_unstructured([(a, "weight"), (b, "weight")], prune.L1Unstructured, amount=60)
    ma, mb = our_mask(a, "weight"), our_mask(b, "weight")
    assert int((~ma).sum() + (~mb).sum()) == 60
    pruned = torch.cat([a.weight.detach()[~ma].abs().float(), b.weight.detach()[~mb].abs().float()])
    kept = torch.cat([a.weight.detach()[ma].abs().float(), b.weight.detach()[mb].abs().float()])
    assert pruned.max() <= kept.min()


def test_random_unstructured_exact_count():
    model = _mixed()
    prune.global_unstructured(_pairs(model), prune.RandomUnstructured, amount=0.5)
    total = sum(getattr(m, n).numel() for m, n in _pairs(model))
    pruned = sum(int((~our_mask(m, n)).sum()) for m, n in _pairs(model))
    assert pruned == round(0.5 * total)
    prune.global_unstructured(_pairs(model), prune.RandomUnstructured, amount=100)
    assert sum(int((~our_mask(m, n)).sum()) for m, n in _pairs(model)) == pruned + 100


def test_custom_unstructured_method_falls_back_to_torch():
    class Largest(tprune.L1Unstructured):
        """Prunes the largest magnitudes: a user-defined unstructured method."""

        def compute_mask(self, t, default_mask):
            return super().compute_mask(-t.abs(), default_mask)

    ours = _mixed()
    theirs = copy.deepcopy(ours)
    prune.global_unstructured(_pairs(ours), Largest, amount=0.3)
    tprune.global_unstructured(_pairs(theirs), Largest, amount=0.3)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("opt", ["nnopt.AdamW", "torch.Adam.foreach"])
def test_zeros_survive_training(opt):
    model = mlp()
    prune.global_unstructured(_pairs(model), prune.L1Unstructured, amount=0.7)
    train(model, OPTIMIZERS[opt], steps=4)
    assert pruned_entries_are_zero(model)


def test_no_concatenation_of_scores(monkeypatch):
    """The selection gets the per-tensor scores: no float vector of them is ever built."""
    cat = torch.cat

    def boom(*args, **kwargs):
        raise AssertionError("scores were concatenated")

    def checked_cat(tensors, *args, **kwargs):
        if any(t.is_floating_point() and t.numel() >= 64 for t in tensors):
            boom()
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "parameters_to_vector", boom)
    monkeypatch.setattr(torch, "cat", checked_cat)
    model = _mixed()
    prune.global_unstructured(_pairs(model), prune.L1Unstructured, amount=0.5)
    assert prune.is_pruned(model)


@pytest.mark.parametrize("params,method,kwargs,word", [
    ("model", "L1Unstructured", dict(amount=-1), "amount"),
    ("model", "L1Unstructured", dict(amount=1.2), "amount"),
    ("model", "L1Unstructured", dict(amount=10 ** 6), "amount"),
    ("model", "L1Unstructured", dict(amount="x"), "amount"),
    ("model", "LnStructured", dict(amount=1, n=1, dim=0), "unstructured"),
    ("unknown", "L1Unstructured", dict(amount=1), "nope"),
    (3, "L1Unstructured", dict(amount=1), "parameters"),
    ("model", "L1Unstructured", dict(amount=1, importance_scores=[1]), "importance_scores"),
])
def test_bad_input_raises_torchs_type_and_changes_nothing(params, method, kwargs, word):
    results = []
    for p in (tprune, prune):
        model = _mixed()
        p.l1_unstructured(model[0], "weight", 0.5)
        pairs = {"model": _pairs(model), "unknown": [(model[0], "weight"), (model[2], "nope")]}.get(params, params)
        before = snapshot(model)
        with pytest.raises(Exception) as err:
            p.global_unstructured(pairs, getattr(p, method), **kwargs)
        results.append(err.value)
        if p is prune:
            assert_unchanged(model, before)
    assert type(results[1]) is type(results[0])
    assert word in str(results[1])
