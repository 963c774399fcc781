"""nnopt.prune's torch-compatible methods: torch's masks, exact counts, zeros through training, torch's errors."""

import copy

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from nnopt import prune, sparsity
from tests.prune._helpers import (
    OPTIMIZERS,
    assert_same_pruning,
    assert_unchanged,
    convnet,
    mlp,
    our_mask,
    pruned_entries_are_zero,
    snapshot,
    train,
)

AMOUNTS = [0.0, 0.3, 0.5, 1.0, 0, 7, 40]


def pair(factory=mlp):
    model = factory()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_l1_unstructured_matches_torch(amount, name):
    ours, theirs = pair()
    numel = getattr(ours[0], name).numel()
    if isinstance(amount, int) and amount > numel:
        amount = numel
    prune.l1_unstructured(ours[0], name, amount)
    tprune.l1_unstructured(theirs[0], name, amount)
    assert_same_pruning(ours[0], theirs[0], name)
    assert not hasattr(ours[0], name + "_orig")
    assert not any(isinstance(h, tprune.BasePruningMethod) for h in ours[0]._forward_pre_hooks.values())
    assert isinstance(getattr(ours[0], name), nn.Parameter)
    assert sparsity.get_mask(getattr(ours[0], name)) is our_mask(ours[0], name)


@pytest.mark.parametrize("n", [1, 2, float("inf"), float("-inf")])
@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("amount", [0.4, 2])
def test_ln_structured_matches_torch_along_each_dim(n, dim, amount):
    ours, theirs = pair(convnet)
    prune.ln_structured(ours[0], "weight", amount, n=n, dim=dim)
    tprune.ln_structured(theirs[0], "weight", amount, n=n, dim=dim)
    assert_same_pruning(ours[0], theirs[0], "weight")


@pytest.mark.parametrize("n", [1, 2, float("inf")])
@pytest.mark.parametrize("dim", [0, 1])
def test_ln_structured_linear(n, dim):
    ours, theirs = pair()
    prune.ln_structured(ours[0], "weight", 0.5, n=n, dim=dim)
    tprune.ln_structured(theirs[0], "weight", 0.5, n=n, dim=dim)
    assert_same_pruning(ours[0], theirs[0], "weight")


# Repeated pruning prunes among the remaining entries (channels), mixing criteria, fractions and counts.
SEQUENCES = [
    [("l1", 0.3), ("l1", 0.3), ("l1", 10)],
    [("l1", 50), ("ln", 0.25, 2, 0), ("l1", 0.5)],
    [("ln", 0.2, 1, 1), ("ln", 3, float("inf"), 0), ("ln", 0.5, 2, 1), ("l1", 0.2)],
    [("custom",), ("l1", 0.4), ("ln", 0.3, 1, 0)],
    [("identity",), ("ln", 2, 2, 0), ("identity",), ("l1", 1.0)],
]


def _step(p, module, step, mask):
    kind = step[0]
    if kind == "l1":
        p.l1_unstructured(module, "weight", step[1])
    elif kind == "ln":
        p.ln_structured(module, "weight", step[1], n=step[2], dim=step[3])
    elif kind == "custom":
        p.custom_from_mask(module, "weight", mask)
    else:
        p.identity(module, "weight")


@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: "-".join(str(x[0]) for x in s))
def test_repeated_pruning_matches_torch(seq):
    ours, theirs = pair()
    mask = torch.rand_like(ours[2].weight) > 0.3
    for step in seq:
        _step(prune, ours[2], step, mask)
        _step(tprune, theirs[2], step, mask)
        assert_same_pruning(ours[2], theirs[2], "weight")


def test_importance_scores_match_torch():
    ours, theirs = pair()
    scores = torch.randn_like(ours[0].weight)
    prune.l1_unstructured(ours[0], "weight", 0.4, importance_scores=scores)
    tprune.l1_unstructured(theirs[0], "weight", 0.4, importance_scores=scores)
    assert_same_pruning(ours[0], theirs[0], "weight")
    prune.ln_structured(ours[0], "weight", 3, n=2, dim=0, importance_scores=scores)
    tprune.ln_structured(theirs[0], "weight", 3, n=2, dim=0, importance_scores=scores)
    assert_same_pruning(ours[0], theirs[0], "weight")


def test_custom_from_mask_identity_and_remove():
    ours, theirs = pair()
    m = torch.tensor([1.0, 0.0] * 12)
    prune.custom_from_mask(ours[0], "bias", m)
    tprune.custom_from_mask(theirs[0], "bias", m)
    assert_same_pruning(ours[0], theirs[0], "bias")
    prune.identity(ours[2], "weight")
    assert our_mask(ours[2], "weight").all() and prune.is_pruned(ours)
    assert not prune.is_pruned(mlp())

    prune.remove(ours[0], "bias")
    assert "bias_mask" not in ours[0]._buffers and sparsity.get_mask(ours[0].bias) is None
    assert (ours[0].bias[m == 0] == 0).all()
    prune.remove(ours[2], "weight")
    assert not prune.is_pruned(ours)
    # pruned by torch: remove undoes torch's reparametrisation too
    prune.remove(theirs[0], "bias")
    assert "bias_orig" not in dict(theirs[0].named_parameters()) and not tprune.is_pruned(theirs)
    assert prune.is_pruned(convnet()) is False


@pytest.mark.parametrize("amount", [0.3, 11, 1.0])
def test_random_unstructured_exact_count(amount):
    model = mlp()
    w = model[0].weight
    prune.random_unstructured(model[0], "weight", amount)
    k = amount if isinstance(amount, int) else round(amount * w.numel())
    assert int((~our_mask(model[0], "weight")).sum()) == k
    remaining = w.numel() - k
    prune.random_unstructured(model[0], "weight", 0.5)  # among the remaining entries
    assert int((~our_mask(model[0], "weight")).sum()) == k + round(0.5 * remaining)
    assert (w[~our_mask(model[0], "weight")] == 0).all()


@pytest.mark.parametrize("dim", [0, 1])
def test_random_structured_exact_channel_count(dim):
    model = mlp()
    prune.random_structured(model[0], "weight", 0.25, dim=dim)
    mask = our_mask(model[0], "weight")
    other = 1 - dim
    dead = (~mask).all(dim=other)
    assert int(dead.sum()) == round(0.25 * mask.shape[dim])
    assert mask.all(dim=other).sum() == mask.shape[dim] - dead.sum()  # whole channels only
    prune.random_structured(model[0], "weight", 2, dim=dim)
    assert int((~our_mask(model[0], "weight")).all(dim=other).sum()) == int(dead.sum()) + 2


def test_random_methods_draw_torch_numbers():
    """The same seed gives torch's masks: the random methods draw exactly torch's random numbers."""
    ours, theirs = pair()
    for p, model in ((prune, ours), (tprune, theirs)):
        torch.manual_seed(3)
        p.random_unstructured(model[0], "weight", 0.3)
        p.random_structured(model[0], "weight", 0.3, dim=0)
    assert_same_pruning(ours[0], theirs[0], "weight")


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_pruned_entries_stay_zero_while_training(opt):
    model = mlp()
    prune.l1_unstructured(model[0], "weight", 0.6)
    prune.ln_structured(model[2], "weight", 0.5, n=2, dim=0)
    prune.random_unstructured(model[4], "bias", 1)
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
    before = model[0].weight.detach().clone()
    train(model, OPTIMIZERS[opt], steps=5)
    assert pruned_entries_are_zero(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in masks.items())
    kept = our_mask(model[0], "weight")
    assert not torch.equal(model[0].weight[kept], before[kept])  # the kept entries did train


def test_forward_is_dense():
    """No forward hook recomputes the weight: forward equals the dense computation on the zeroed weight."""
    model = mlp()
    prune.l1_unstructured(model[0], "weight", 0.5)
    x = torch.randn(4, 13)
    w = model[0].weight.detach().clone()
    torch.testing.assert_close(model[0](x), x @ w.T + model[0].bias, rtol=0, atol=0)


# ---- bad input: torch's exception type, a message naming the argument, the module left unchanged ----

def _int_buffer_module():
    m = nn.Linear(3, 2)
    m.register_buffer("counts", torch.arange(6).view(2, 3))
    return m


BAD = [
    ("l1_unstructured", dict(name="weight", amount=-1), "amount"),
    ("l1_unstructured", dict(name="weight", amount=-0.1), "amount"),
    ("l1_unstructured", dict(name="weight", amount=1.5), "amount"),
    ("l1_unstructured", dict(name="weight", amount=10_000), "amount"),
    ("l1_unstructured", dict(name="weight", amount="half"), "amount"),
    ("l1_unstructured", dict(name="nope", amount=0.5), "nope"),
    ("l1_unstructured", dict(name="weight", amount=0.5, importance_scores=torch.ones(2, 2)), "importance_scores"),
    ("random_unstructured", dict(name="weight", amount=-3), "amount"),
    ("random_unstructured", dict(name="weight", amount=10_000), "amount"),
    ("random_unstructured", dict(name="nope", amount=1), "nope"),
    ("ln_structured", dict(name="weight", amount=1.01, n=2, dim=0), "amount"),
    ("ln_structured", dict(name="weight", amount=25, n=2, dim=0), "amount"),
    ("ln_structured", dict(name="weight", amount=0.5, n=2, dim=2), "dim"),
    ("ln_structured", dict(name="bias", amount=0.5, n=2, dim=0), "dim"),
    ("ln_structured", dict(name="nope", amount=0.5, n=2, dim=0), "nope"),
    ("random_structured", dict(name="weight", amount=-1, dim=0), "amount"),
    ("random_structured", dict(name="weight", amount=14, dim=1), "amount"),
    ("random_structured", dict(name="weight", amount=0.5, dim=5), "dim"),
    ("custom_from_mask", dict(name="weight", mask=torch.ones(3, 3)), "mask"),
    ("custom_from_mask", dict(name="nope", mask=torch.ones(3, 3)), "nope"),
]


def _run(p, fn, module, kwargs):
    try:
        getattr(p, fn)(module, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    return None


@pytest.mark.parametrize("pruned_first", [False, True])
@pytest.mark.parametrize("fn,kwargs,word", BAD, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_torchs_type_and_changes_nothing(fn, kwargs, word, pruned_first):
    ours, theirs = pair()
    if pruned_first:  # counts are then checked against what remains
        prune.l1_unstructured(ours[0], "weight", 0.5)
        tprune.l1_unstructured(theirs[0], "weight", 0.5)
    expected = _run(tprune, fn, theirs[0], kwargs)
    assert expected is not None
    before = snapshot(ours)
    with pytest.raises(type(expected)) as err:
        getattr(prune, fn)(ours[0], **kwargs)
    assert type(err.value) is type(expected)
    assert word in str(err.value)
    assert_unchanged(ours, before)


@pytest.mark.parametrize("fn,kwargs", [
    ("l1_unstructured", dict(amount=0.5)), ("random_unstructured", dict(amount=1)),
    ("ln_structured", dict(amount=1, n=1, dim=0)), ("identity", {}),
    ("custom_from_mask", dict(mask=torch.ones(2, 3))),
])
def test_non_floating_tensor_raises_type_error(fn, kwargs):
    m = _int_buffer_module()
    before = snapshot(m)
    with pytest.raises(TypeError, match="counts"):
        getattr(prune, fn)(m, "counts", **kwargs)
    assert_unchanged(m, before)


def test_bool_amount_is_a_type_error_as_in_torch():
    ours, theirs = pair()
    with pytest.raises(TypeError):
        tprune.l1_unstructured(theirs[0], "weight", True)
    before = snapshot(ours)
    with pytest.raises(TypeError, match="amount"):
        prune.l1_unstructured(ours[0], "weight", True)
    assert_unchanged(ours, before)


def test_remove_of_an_unpruned_tensor_raises_value_error():
    model = mlp()
    with pytest.raises(ValueError, match="weight"):
        tprune.remove(model[0], "weight")
    with pytest.raises(ValueError, match="weight"):
        prune.remove(model[0], "weight")
