"""Pruner: reaches the schedule's targets per layer and globally, with any criterion, and resumes from state_dict."""

import functools

import pytest
import torch
from torch import nn

from nnopt.prune._contract import apply_mask, current_mask
from nnopt.prune.methods import l1_unstructured, ln_structured, random_unstructured
from nnopt.prune.pruner import Pruner
from nnopt.prune.schedules import cubic, linear, one_shot



def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 7))


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def train_step(model, opt, step):
    """A deterministic step of training: data drawn from a generator seeded by the step."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(32, 20, generator=g), torch.randint(0, 7, (32,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_layer_scope_reaches_each_target_exactly():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = linear(0.0, 0.8, begin=2, end=20, frequency=3)
    # given the optimizer, pruning zeroes its momentum at pruned entries, which stay exactly 0 through training
    pruner = Pruner(model, l1_unstructured, schedule, optimizer=opt)
    previous = [current_mask(m, "weight").clone() for m in linears(model)]
    for step in range(25):
        train_step(model, opt, step)
        target = pruner.step()
        assert target == schedule(step)
        for layer, before in zip(linears(model), previous):
            mask = current_mask(layer, "weight")
            assert int((~mask).sum()) == round(target * mask.numel())
            assert (layer.weight[~mask] == 0).all()
            assert not (~before & mask).any()  # pruned entries stay pruned
        previous = [current_mask(m, "weight").clone() for m in linears(model)]
    assert pruner.step_count == 25
    overall, per = pruner.sparsity()
    assert abs(overall - 0.8) < 1e-2 and len(per) == 3


def test_global_scope_reaches_target_over_all_tensors_and_matches_torch():
    model = mlp()
    ref = mlp()
    pruner = Pruner(model, l1_unstructured, one_shot(0.7), scope="global")
    assert pruner.step() == 0.7
    total = sum(m.weight.numel() for m in linears(model))
    pruned = sum(int((~current_mask(m, "weight")).sum()) for m in linears(model))
    assert pruned == round(0.7 * total)
    per_layer = [float((~current_mask(m, "weight")).float().mean()) for m in linears(model)]
    assert max(per_layer) - min(per_layer) > 0.01  # global: the layers differ
    torch.nn.utils.prune.global_unstructured([(m, "weight") for m in linears(ref)],
                                             pruning_method=torch.nn.utils.prune.L1Unstructured, amount=0.7)
    for m, r in zip(linears(model), linears(ref)):
        assert torch.equal(current_mask(m, "weight"), r.weight_mask.bool())


def test_global_scope_gradual_with_random_criterion_and_pairs():
    model = mlp()
    pairs = [(m, "weight") for m in linears(model)] + [(model[0], "bias")]
    schedule = cubic(0.0, 0.9, begin=0, end=10, frequency=2)
    pruner = Pruner(pairs, random_unstructured, schedule, scope="global")
    total = sum(getattr(m, n).numel() for m, n in pairs)
    for step in range(12):
        target = pruner.step()
        pruned = sum(int((~current_mask(m, n)).sum()) for m, n in pairs)
        assert pruned == round(target * total)


def test_structured_method_prunes_whole_rows_to_target():
    model = mlp()
    method = functools.partial(ln_structured, n=2, dim=0)
    pruner = Pruner(model, method, linear(0.0, 0.5, 0, 4))
    for step in range(5):
        target = pruner.step()
        for layer in linears(model):
            rows = current_mask(layer, "weight").any(1)
            assert int((~rows).sum()) == round(target * rows.numel())
            assert (current_mask(layer, "weight").all(1) | ~rows).all()  # whole rows only


def test_any_criterion_importance_scores_and_unknown_method():
    model = mlp()
    # importance = column index: the lowest columns go first
    def scores(m, n):
        return torch.arange(m.weight.shape[1]).float().expand_as(m.weight).contiguous()

    Pruner(model, l1_unstructured, one_shot(0.2), importance_scores=scores).step()
    first = current_mask(model[0], "weight")
    assert not first[:, :4].any() and first[:, 4:].all()

    calls = []

    def my_method(module, name, amount):
        calls.append(amount)
        return l1_unstructured(module, name, amount)

    model = mlp()
    pruner = Pruner(model, my_method, linear(0.0, 0.6, 0, 2))
    for _ in range(3):
        target = pruner.step()
        for layer in linears(model):
            mask = current_mask(layer, "weight")
            assert abs(int((~mask).sum()) - target * mask.numel()) <= 1
    assert calls and all(isinstance(a, float) and 0 < a <= 1 for a in calls)


def _load_pruned(model, state):
    """A fresh model takes a pruned model's state_dict: masks first, then the values."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key in state:
            rest = key[len(prefix):]
            if key.startswith(prefix) and "." not in rest and rest.endswith("_mask"):
                apply_mask(module, rest[:-len("_mask")], state[key])
    model.load_state_dict(state)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_resume_from_state_dict_matches_uninterrupted_run(scope):
    schedule = cubic(0.0, 0.85, begin=3, end=30, frequency=3)

    def run(model, pruner, opt, steps):
        for step in steps:
            train_step(model, opt, step)
            pruner.step()

    whole = mlp()
    opt = torch.optim.SGD(whole.parameters(), lr=0.05)
    run(whole, Pruner(whole, l1_unstructured, schedule, scope=scope), opt, range(40))

    first = mlp()
    opt = torch.optim.SGD(first.parameters(), lr=0.05)
    pruner = Pruner(first, l1_unstructured, schedule, scope=scope)
    run(first, pruner, opt, range(17))
    model_state, pruner_state = first.state_dict(), pruner.state_dict()

    resumed = mlp(seed=123)  # different initial weights: everything must come from the checkpoint
    _load_pruned(resumed, model_state)
    pruner = Pruner(resumed, l1_unstructured, schedule, scope=scope)
    pruner.load_state_dict(pruner_state)
    assert pruner.step_count == 17
    opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    run(resumed, pruner, opt, range(17, 40))
    for a, b in zip(linears(whole), linears(resumed)):
        assert torch.equal(current_mask(a, "weight"), current_mask(b, "weight"))
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="scope"):
        Pruner(model, l1_unstructured, one_shot(0.5), scope="model")
    with pytest.raises(ValueError, match="global"):
        Pruner(model, functools.partial(ln_structured, n=2, dim=0), one_shot(0.5), scope="global")
    with pytest.raises(TypeError, match="method"):
        Pruner(model, "l1", one_shot(0.5))
    with pytest.raises(TypeError, match="schedule"):
        Pruner(model, l1_unstructured, 0.5)
    with pytest.raises(ValueError, match="model_or_parameters"):
        Pruner(nn.ReLU(), l1_unstructured, one_shot(0.5))
    with pytest.raises(ValueError, match="schedule returned"):
        Pruner(model, l1_unstructured, lambda step: 1.5).step()
    pruner = Pruner(model, l1_unstructured, one_shot(0.5))
    with pytest.raises(ValueError, match="tensors"):
        pruner.load_state_dict({"step_count": 3, "target": 0.5, "num_tensors": 7})
    with pytest.raises(KeyError, match="step_count"):
        pruner.load_state_dict({"target": 0.5})
    assert all(not hasattr(m, "weight_mask") for m in linears(model))  # nothing pruned by the failures
