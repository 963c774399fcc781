"""Beyond torch: N:M, block and exact-zero pruning; gradient importance; the sparsity report."""

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from nnopt import prune
from tests.prune._helpers import OPTIMIZERS, assert_unchanged, mlp, our_mask, pruned_entries_are_zero, snapshot, train


def _nm_oracle(w, n, m):
    """Keep mask of the n largest |w| in each group of m consecutive entries along the last dim."""
    groups = w.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for i, g in enumerate(groups):
        keep[i, sorted(range(m), key=lambda j: -float(g[j]))[:n]] = True
    return keep.reshape(w.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (0, 2), (3, 3)])
def test_nm_structured_linear(n, m):
    lin = nn.Linear(24, 5)
    prune.nm_structured(lin, "weight", n=n, m=m)
    mask = our_mask(lin, "weight")
    assert torch.equal(mask.reshape(5, -1, m).sum(-1), torch.full((5, 24 // m), n))
    assert torch.equal(mask, _nm_oracle(lin.weight.detach(), n, m))
    assert (lin.weight[~mask] == 0).all()


def test_nm_structured_on_top_of_a_mask_and_conv_input_channels():
    lin = nn.Linear(8, 3)
    prune.custom_from_mask(lin, "weight", torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1]] * 3))
    w = lin.weight.detach().clone()
    prune.nm_structured(lin, "weight", 2, 4)
    mask = our_mask(lin, "weight")
    assert not mask[:, 1].any() and torch.equal(mask.reshape(3, 2, 4).sum(-1), torch.full((3, 2), 2))
    assert torch.equal(mask[:, 4:], _nm_oracle(w[:, 4:], 2, 4))
    conv = nn.Conv2d(8, 2, 3)
    prune.nm_structured(conv, "weight", 2, 4)  # groups along the input channels (dim 1)
    assert torch.equal(our_mask(conv, "weight").reshape(2, 2, 4, 3, 3).sum(2), torch.full((2, 2, 3, 3), 2))


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(n=2, m=5), ValueError, "m=5"),
    (dict(n=5, m=4), ValueError, "n=5"),
    (dict(n=-1, m=4), ValueError, "n=-1"),
    (dict(n=2, m=0), ValueError, "m=0"),
    (dict(n=2.0, m=4), TypeError, "n"),
    (dict(n=2, m=4, dim=3), IndexError, "dim"),
])
def test_nm_structured_bad_input(kwargs, exc, word):
    lin = nn.Linear(12, 3)
    before = snapshot(lin)
    with pytest.raises(exc, match=word):
        prune.nm_structured(lin, "weight", **kwargs)
    assert_unchanged(lin, before)


def _block_oracle(w, bn, bk, k):
    rows, cols = w.shape
    blocks = [(w[i:i + bn, j:j + bk].abs().sum().item(), i, j) for i in range(0, rows, bn) for j in range(0, cols, bk)]
    keep = torch.ones_like(w, dtype=torch.bool)
    for _, i, j in sorted(blocks, key=lambda b: b[0])[:k]:
        keep[i:i + bn, j:j + bk] = False
    return keep


@pytest.mark.parametrize("shape,block", [((64, 64), (32, 32)), ((70, 45), (32, 16)), ((9, 10), (4, 3)),
                                         ((8, 8), (1, 1))])
@pytest.mark.parametrize("amount", [0.0, 0.5, 3, 1.0])
def test_block_unstructured_prunes_the_smallest_blocks(shape, block, amount):
    lin = nn.Linear(shape[1], shape[0])
    w = lin.weight.detach().clone()
    nblocks = -(-shape[0] // block[0]) * -(-shape[1] // block[1])
    k = amount if isinstance(amount, int) else round(amount * nblocks)
    prune.block_unstructured(lin, "weight", amount, block=block)
    assert torch.equal(our_mask(lin, "weight"), _block_oracle(w, *block, k))
    assert (lin.weight[~our_mask(lin, "weight")] == 0).all()


def test_block_unstructured_repeated_prunes_among_remaining_blocks():
    lin = nn.Linear(40, 40)
    prune.block_unstructured(lin, "weight", 0.5, block=(8, 8))  # 25 blocks -> 12 or 13 pruned
    first = int((~our_mask(lin, "weight")).sum()) // 64
    assert first == round(0.5 * 25)
    prune.block_unstructured(lin, "weight", 0.5, block=(8, 8))
    assert int((~our_mask(lin, "weight")).sum()) // 64 == first + round(0.5 * (25 - first))
    before = snapshot(lin)
    with pytest.raises(ValueError, match="amount"):
        prune.block_unstructured(lin, "weight", 25 - first, block=(8, 8))
    assert_unchanged(lin, before)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(amount=-1), ValueError, "amount"), (dict(amount=1.5), ValueError, "amount"),
    (dict(amount=5, block=(8, 8)), ValueError, "amount"), (dict(amount=0.5, block=(0, 4)), ValueError, "block"),
    (dict(amount=0.5, block=4), TypeError, "block"), (dict(amount="x"), TypeError, "amount"),
])
def test_block_unstructured_bad_input(kwargs, exc, word):
    lin = nn.Linear(16, 16)
    before = snapshot(lin)
    with pytest.raises(exc, match=word):
        prune.block_unstructured(lin, "weight", **kwargs)
    assert_unchanged(lin, before)
    with pytest.raises(ValueError):
        prune.block_unstructured(lin, "bias", 0.5)


def test_zeros_masks_exact_zeros():
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.2] = 0
    zero = lin.weight == 0
    prune.zeros(lin, "weight")
    assert torch.equal(our_mask(lin, "weight"), ~zero)
    train(nn.Sequential(lin), OPTIMIZERS["torch.SGD"], steps=3, in_features=6)
    assert (lin.weight[zero] == 0).all()


def test_structured_patterns_stay_zero_while_training():
    model = mlp((16, 32, 8))
    prune.nm_structured(model[0], "weight")
    prune.block_unstructured(model[2], "weight", 0.5, block=(4, 8))
    train(model, OPTIMIZERS["nnopt.AdamW"], steps=4, in_features=16)
    assert pruned_entries_are_zero(model)


# ---- gradient importance ----

def _backward(model, in_features=13):
    model.zero_grad()
    model(torch.randn(8, in_features)).square().mean().backward()


def test_weight_grad_importance_with_l1_and_global():
    model = mlp()
    _backward(model)
    scores = prune.weight_grad(model[0], "weight")
    torch.testing.assert_close(scores, (model[0].weight * model[0].weight.grad).abs())
    theirs = nn.Linear(13, 24)
    theirs.load_state_dict(model[0].state_dict())
    prune.l1_unstructured(model[0], "weight", 0.3, importance_scores=scores)
    tprune.l1_unstructured(theirs, "weight", 0.3, importance_scores=scores)
    assert torch.equal(our_mask(model[0], "weight"), theirs.weight_mask != 0)
    pairs = [(model[0], "weight"), (model[2], "weight")]
    _backward(model)
    prune.global_unstructured(pairs, prune.L1Unstructured, importance_scores=prune.weight_grad_scores(pairs),
                              amount=50)
    assert int((~our_mask(model[2], "weight")).sum()) + int((~our_mask(model[0], "weight")).sum()) == \
        round(0.3 * 13 * 24) + 50


def test_taylor_accumulates_over_batches():
    model = mlp()
    pairs = [(model[0], "weight"), (model[2], "bias")]
    taylor = prune.Taylor(pairs)
    linear = prune.Taylor(pairs, squared=False)
    grads = []
    for _ in range(3):
        _backward(model)
        taylor.update()
        linear.update()
        grads.append(model[0].weight.grad.clone())
    w = model[0].weight.detach()
    torch.testing.assert_close(taylor.score(model[0], "weight"), sum((w * g) ** 2 for g in grads) / 3)
    torch.testing.assert_close(linear.score(model[0], "weight"), (w * sum(grads) / 3).abs())
    scores = taylor.scores()
    assert set(scores) == set(pairs)
    prune.global_unstructured(pairs, prune.L1Unstructured, importance_scores=scores, amount=0.2)
    assert prune.is_pruned(model)
    taylor.reset()
    with pytest.raises(RuntimeError, match="update"):
        taylor.score(model[0], "weight")
    with pytest.raises(RuntimeError, match="gradient"):
        prune.weight_grad(nn.Linear(2, 2), "weight")


# ---- report ----

def test_report_data_and_table():
    model = mlp((64, 40, 3))
    prune.block_unstructured(model[0], "weight", 2, block=(32, 32))
    prune.l1_unstructured(model[2], "bias", 1)
    rows = prune.report(model)
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    by = {(r["layer"], r["param"]): r for r in rows}
    w = by[("0", "weight")]
    assert w["params"] == 64 * 40 and w["shape"] == (40, 64) and w["masked"]
    assert w["nonzeros"] == int(torch.count_nonzero(model[0].weight))
    assert w["sparsity"] == pytest.approx(1 - w["nonzeros"] / w["params"])
    assert w["block_sparsity"] == pytest.approx(2 / 4)  # 40x64 in 32x32 tiles: 2 x 2 tiles (edge ones 8x32)
    assert by[("2", "bias")]["block_sparsity"] is None and by[("2", "bias")]["nonzeros"] == 2
    assert not by[("0", "bias")]["masked"]
    assert rows.total["params"] == sum(p.numel() for p in model.parameters())
    text = str(rows)
    assert "sparsity" in text and "32x32" in text and "total" in text and "0" in text
    assert len(text.splitlines()) == len(rows) + 4
