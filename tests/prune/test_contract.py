"""The mask contract: zeros hold under optimizers with state even when pruning happens mid-training."""

import pytest
import torch

import nnopt.optim
import nnopt.prune as prune


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
    lambda ps: nnopt.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda ps: nnopt.optim.AdamW(ps, lr=0.01),
], ids=["torch-SGD-momentum", "torch-Adam", "torch-RMSprop", "nnopt-SGD", "nnopt-AdamW"])
def test_pruned_mid_training_stays_zero(make):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = make(m.parameters())
    for i in range(5):
        opt.zero_grad()
        m(torch.randn(4, 8)).square().sum().backward()
        opt.step()
        if i == 1:  # the optimizer already holds momentum for every entry
            prune.l1_unstructured(m[0], "weight", amount=0.5)
    mask = m[0].weight_mask
    assert mask.sum() == 32
    assert (m[0].weight[~mask] == 0).all()


def test_loading_dense_weights_keeps_pruned_entries_zero():
    m = torch.nn.Linear(6, 4)
    dense = {k: v.clone() for k, v in m.state_dict().items()}
    prune.l1_unstructured(m, "weight", amount=0.5)
    m.load_state_dict(dense, strict=False)
    assert (m.weight[~m.weight_mask] == 0).all()


def test_frozen_pruned_layer_forward_does_not_rewrite_the_weight():
    m = torch.nn.Linear(6, 4).requires_grad_(False)
    prune.l1_unstructured(m, "weight", amount=0.5)
    calls = []
    from nnopt import sparsity

    real = sparsity.set_mask
    sparsity.set_mask = lambda *a: (calls.append(1), real(*a))[1]
    try:
        for _ in range(3):
            m(torch.randn(2, 6))
    finally:
        sparsity.set_mask = real
    assert calls == []


def test_global_keeps_nan_weights_like_torch():
    m = torch.nn.Linear(10, 10)
    with torch.no_grad():
        m.weight[0, :3] = float("nan")
    prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=50)
    assert int((~m.weight_mask).sum()) == 50
