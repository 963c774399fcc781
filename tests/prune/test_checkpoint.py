"""Checkpoints and copies of pruned models: state_dict/restore, deepcopy, pickle, and from_torch."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from nnopt import prune, sparsity
from tests.prune._helpers import OPTIMIZERS, mlp, our_mask, pruned_entries_are_zero, train


def pruned_model():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", 0.6)
    prune.ln_structured(model[2], "weight", 0.5, n=1, dim=0)
    prune.custom_from_mask(model[4], "bias", torch.tensor([True, False, True]))
    return model


def masks_of(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("opt", ["nnopt.AdamW", "torch.SGD"])
def test_restore_into_a_fresh_model(opt):
    model = pruned_model()
    train(model, OPTIMIZERS[opt], steps=2)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)

    fresh = mlp(seed=1)
    with pytest.raises(RuntimeError):  # plain load_state_dict cannot take the masks
        fresh.load_state_dict(state)
    fresh = mlp(seed=1)
    prune.restore(fresh, state)
    assert_same_model(fresh, model)
    assert prune.is_pruned(fresh)
    assert sparsity.get_mask(fresh[0].weight) is our_mask(fresh[0], "weight")
    masks = masks_of(fresh)
    train(fresh, OPTIMIZERS[opt], steps=3)
    assert pruned_entries_are_zero(fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in masks.items())
    prune.l1_unstructured(fresh[0], "weight", 0.5)  # pruning again goes on from the restored mask
    assert not (our_mask(fresh[0], "weight") & ~masks["0.weight_mask"]).any()


def test_restore_errors_leave_the_model_unchanged():
    state = pruned_model().state_dict()
    bad_shape = mlp((13, 24, 10, 4))
    before = copy.deepcopy(bad_shape.state_dict())
    with pytest.raises(RuntimeError, match="shape"):
        prune.restore(bad_shape, state)
    assert bad_shape.state_dict().keys() == before.keys()
    assert all(torch.equal(bad_shape.state_dict()[k], before[k]) for k in before)
    assert not prune.is_pruned(bad_shape)
    extra = dict(state, **{"9.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="9.weight"):
        prune.restore(mlp(), extra)
    fresh = mlp()
    missing, unexpected = prune.restore(fresh, extra, strict=False)
    assert unexpected == ["9.weight"] and missing == []
    assert torch.equal(our_mask(fresh[0], "weight"), state["0.weight_mask"])


def test_restore_ignores_buffers_that_merely_end_in_mask():
    class WithAttnMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("attn_mask", torch.ones(4, 4, dtype=torch.bool))

        def forward(self, x):
            return self.lin(x)

    model = WithAttnMask()
    prune.l1_unstructured(model.lin, "weight", 0.5)
    fresh = WithAttnMask()
    prune.restore(fresh, model.state_dict())
    assert_same_model(fresh, model)
    assert prune.is_pruned(fresh.lin) and "attn" not in prune.methods.pruned_names(fresh)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("opt", ["nnopt.AdamW", "torch.Adam.foreach"])
def test_copies_keep_masks_and_zeros_through_training(how, opt):
    model = pruned_model()
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert_same_model(twin, model)
    masks = masks_of(model)
    train(twin, OPTIMIZERS[opt], steps=4)
    assert pruned_entries_are_zero(twin)
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in masks.items())
    # the original is untouched by the copy's training and keeps its own links
    assert sparsity.get_mask(model[0].weight) is our_mask(model[0], "weight")
    assert sparsity.get_mask(twin[0].weight) is our_mask(twin[0], "weight")
    assert sparsity.get_mask(twin[0].weight) is not sparsity.get_mask(model[0].weight)


def test_relink_before_any_forward():
    twin = copy.deepcopy(pruned_model())
    prune.relink(twin)
    assert sparsity.get_mask(twin[2].weight) is our_mask(twin[2], "weight")
    opt = OPTIMIZERS["nnopt.AdamW"](twin.parameters())
    twin[0].weight.grad = torch.ones_like(twin[0].weight)  # a gradient that did not come from a forward
    opt.step()
    assert pruned_entries_are_zero(twin)


def _torch_pruned():
    model = mlp()
    tprune.l1_unstructured(model[0], "weight", 0.6)
    tprune.ln_structured(model[0], "weight", 0.3, n=2, dim=0)
    tprune.random_unstructured(model[2], "bias", 3)
    return model


def test_from_torch():
    model = _torch_pruned()
    expected = {"0.weight": model[0].weight.detach().clone(), "0.weight_mask": model[0].weight_mask != 0,
                "2.bias": model[2].bias.detach().clone(), "2.bias_mask": model[2].bias_mask != 0}
    orig = model[0].weight_orig
    x = torch.randn(5, 13)
    out = model(x)
    prune.from_torch(model)
    assert not tprune.is_pruned(model) and prune.is_pruned(model)
    assert model[0].weight is orig  # the same Parameter object: optimizers built on it keep working
    sd = model.state_dict()
    assert not any(k.endswith("_orig") for k in sd)
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    train(model, OPTIMIZERS["torch.SGD"], steps=3)
    assert pruned_entries_are_zero(model)


def test_restore_a_torch_pruned_checkpoint():
    model = _torch_pruned()
    model(torch.randn(2, 13))
    fresh = mlp(seed=5)
    prune.restore(fresh, model.state_dict())
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[2].bias, model[2].bias)
    assert torch.equal(our_mask(fresh[0], "weight"), model[0].weight_mask != 0)
    assert torch.equal(fresh[4].weight, model[4].weight)
