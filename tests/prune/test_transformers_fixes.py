"""Pruning transformers models end to end: Conv1D as the Linear it is in every entry point, masks back after
save_pretrained/from_pretrained, channels_last Conv2d weights, sparse nn.Embedding gradients."""

import pytest
import torch
from torch import nn

import nnopt.prune as prune
from nnopt.prune.pruner import prunable

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D


def conv1d_and_linear(nx=16, nf=12, seed=0):
    """A Conv1D and the nn.Linear computing the same function (weight transposed)."""
    torch.manual_seed(seed)
    c = Conv1D(nf, nx)
    nn.init.normal_(c.weight)
    lin = nn.Linear(nx, nf)
    with torch.no_grad():
        lin.weight.copy_(c.weight.t())
        lin.bias.copy_(c.bias)
    return c, lin


def _gpt2():
    from nnopt.demo import lm

    return lm.build("gpt2", d_model=32, n_layers=2, n_heads=4, seq_len=16)


def test_pruner_finds_conv1d_layers():
    model = _gpt2()
    names = {id(m): n for n, m in model.named_modules()}
    found = [names[id(m)] for m, _ in prunable(model)]
    assert "transformer.h.0.attn.c_attn" in found and "transformer.h.1.mlp.c_proj" in found
    pruner = prune.Pruner(model, prune.l1_unstructured, lambda step: 0.5)
    pruner.step()
    assert float(model.transformer.h[0].mlp.c_fc.weight_mask.float().mean()) == 0.5


def test_nm_structured_groups_conv1d_along_inputs():
    c, lin = conv1d_and_linear()
    prune.nm_structured(c, "weight", 2, 4)
    prune.nm_structured(lin, "weight", 2, 4)
    assert torch.equal(c.weight_mask, lin.weight_mask.t())
    assert (c.weight_mask.reshape(4, 4, 12).sum(1) == 2).all()  # groups of 4 consecutive inputs (dim 0)


def test_block_unstructured_tiles_conv1d_as_linear():
    c, lin = conv1d_and_linear()
    prune.block_unstructured(c, "weight", 0.5, block=(4, 8))
    prune.block_unstructured(lin, "weight", 0.5, block=(4, 8))
    assert torch.equal(c.weight_mask, lin.weight_mask.t())


def test_report_tiles_conv1d_as_linear():
    c, lin = conv1d_and_linear(nx=64, nf=32)
    prune.block_unstructured(lin, "weight", 0.5, block=(32, 32))
    with torch.no_grad():
        c.weight.copy_(lin.weight.t())
    row_c = next(r for r in prune.report(c) if r["param"] == "weight")
    row_l = next(r for r in prune.report(lin) if r["param"] == "weight")
    assert row_c["block_sparsity"] == row_l["block_sparsity"] == 0.5


def test_compact_removes_conv1d_units():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 16), nn.ReLU(), Conv1D(8, 24))
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=1)  # output units of a Conv1D: dim 1
    x = torch.randn(5, 16)
    before = model(x)
    rep = prune.compact(model)
    assert rep.compacted and rep.compacted[0]["removed"] == 12
    assert model[0].weight.shape == (16, 12) and model[2].weight.shape == (12, 8) and model[0].nf == 12
    torch.testing.assert_close(model(x), before)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("how", ["directory", "safetensors dict", "zeros"])
def test_masks_survive_save_pretrained(tmp_path, how):
    model = _gpt2()
    prune.wanda(model, [torch.randint(0, 256, (2, 16))], 0.5)
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert not prune.is_pruned(loaded)  # what from_pretrained does: the masks are dropped
    if how == "directory":
        prune.restore(loaded, tmp_path)
    elif how == "safetensors dict":
        from safetensors.torch import load_file

        sd = load_file(tmp_path / "model.safetensors")
        assert "lm_head.weight" not in sd  # the tied copy is omitted
        prune.restore(loaded, sd)
    else:
        assert len(prune.masks_from_zeros(loaded)) == 8
    _same_state(model, loaded)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    opt = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 16))
    loaded(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    c = loaded.transformer.h[0].mlp.c_fc
    assert (c.weight[~c.weight_mask] == 0).all() and float((c.weight == 0).float().mean()) >= 0.5


def test_restore_strict_still_reports_real_missing_keys():
    model = _gpt2()
    prune.wanda(model, [torch.randint(0, 256, (2, 16))], 0.5)
    sd = dict(model.state_dict())
    del sd["transformer.ln_f.weight"]
    with pytest.raises(RuntimeError, match="transformer.ln_f.weight"):
        prune.restore(_gpt2(), sd)


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_channels_last_conv2d(method):
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 8, 3)
    cl = nn.Conv2d(6, 8, 3)
    cl.load_state_dict(dense.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    assert not cl.weight.is_contiguous()
    for m in (dense, cl):
        torch.manual_seed(1)
        getattr(prune, method)(m, "weight", amount=0.4)
        torch.manual_seed(2)
        getattr(prune, method)(m, "weight", amount=0.3)  # again, through torch's PruningContainer
    assert torch.equal(cl.weight_mask, dense.weight_mask)
    assert torch.equal(cl.weight, dense.weight)


@pytest.mark.parametrize("optimizer", ["SGD", "SparseAdam"])
def test_sparse_embedding(optimizer):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, sparse=True)
    prune.l1_unstructured(emb, "weight", amount=0.5)
    opt = getattr(torch.optim, optimizer)(emb.parameters(), lr=0.1)
    for _ in range(3):
        emb(torch.tensor([[1, 2, 3], [3, 4, 1]])).square().sum().backward()
        assert emb.weight.grad.is_sparse
        assert (emb.weight.grad.to_dense()[~emb.weight_mask] == 0).all()
        opt.step()
        opt.zero_grad()
    assert (emb.weight[~emb.weight_mask] == 0).all()
    assert float(emb.weight_mask.float().mean()) == 0.5
