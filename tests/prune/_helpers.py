"""Shared helpers of the pruning tests: a tie-free model factory, torch comparison, training, snapshots."""

import copy
import itertools

import torch
from torch import nn

import nnopt.optim


def mlp(sizes=(13, 24, 10, 3), seed=0):
    """A Linear/ReLU chain with tie-free weights (random normal values are distinct almost surely)."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 2))


def torch_mask(module, name):
    return getattr(module, name + "_mask") != 0


def our_mask(module, name):
    return module._buffers[name + "_mask"]


def assert_same_pruning(ours, theirs, name):
    """Same mask and the same (exactly zeroed) values as the module pruned by torch.nn.utils.prune."""
    mask = our_mask(ours, name)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch_mask(theirs, name))
    assert torch.equal(getattr(ours, name), getattr(theirs, name))
    assert (getattr(ours, name)[~mask] == 0).all()


OPTIMIZERS = {
    "nnopt.AdamW": lambda p: nnopt.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "nnopt.SGD": lambda p: nnopt.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3),
    "torch.AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "torch.SGD": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3),
    "torch.Adam.foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
}


def train(model, make_optimizer, steps=5, in_features=13, optimizer=None):
    """A few steps of regression on random data; returns the optimizer (to keep training later)."""
    opt = optimizer or make_optimizer(model.parameters())
    for _ in range(steps):
        x = torch.randn(16, in_features)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def pruned_entries_are_zero(model):
    """Every masked tensor holds exact zeros where its mask is False (and at least one tensor is masked)."""
    seen = 0
    for module in model.modules():
        for key, mask in module._buffers.items():
            if key.endswith("_mask") and mask.dtype == torch.bool:
                t = getattr(module, key[: -len("_mask")])
                assert (t[~mask] == 0).all(), key
                seen += 1
    assert seen
    return True


def snapshot(model):
    """Everything a failed call must leave unchanged: tensors, parameter/buffer names, hooks."""
    return (copy.deepcopy({k: v.clone() for k, v in model.state_dict().items()}),
            [(n, p.data_ptr()) for n, p in model.named_parameters()],
            [n for n, _ in model.named_buffers()],
            [list(m._forward_pre_hooks) for m in model.modules()])


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    for k in before[0]:
        assert torch.equal(after[0][k], before[0][k]), k
