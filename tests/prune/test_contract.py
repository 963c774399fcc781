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
