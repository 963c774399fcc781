"""widen_hidden: a wider residual stream on GPT-2, BERT and Llama; exact when the new width is a multiple of the
old one (every feature copied equally often, so norms see the same statistics), reported otherwise."""

import pytest
import torch

from nnopt import sparsity
from nnopt.prune.methods import l1_unstructured
from nnopt.transfer import widen_hidden
from tests.transfer._hf import ARCHS, REL, assert_untouched, build, ids, logits, rel_change, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("split", ["even", "random"])
@pytest.mark.parametrize("arch", ARCHS)
def test_multiple_width_is_exact(arch, split):
    model = build(arch)
    snap = snapshot(model)
    new, report = widen_hidden(model, 64, split=split, generator=torch.Generator().manual_seed(0))
    assert rel_change(logits(model), logits(new)) <= REL
    assert_untouched(model, snap)
    assert new.config.hidden_size == 64
    emb = new.get_input_embeddings()
    assert emb.weight.shape[1] == 64
    out = new.get_output_embeddings()
    if arch != "llama":  # GPT-2 and BERT tie the output embedding to the input one
        assert out.weight is emb.weight
    else:
        assert out.weight.shape == (out.weight.shape[0], 64)
    new.train()
    x = ids()["input_ids"]
    new(input_ids=x, labels=x).loss.backward()  # trains


def test_random_split_breaks_the_symmetry_of_copies():
    model = build("llama")
    even, _ = widen_hidden(model, 64)
    rand, _ = widen_hidden(model, 64, split="random", generator=torch.Generator().manual_seed(0))
    q_even = even.model.layers[0].self_attn.q_proj.weight
    q_rand = rand.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_even[:, :32], q_even[:, 32:])  # even: the copies' columns are equal halves
    assert not torch.allclose(q_rand[:, :32], q_rand[:, 32:])
    assert torch.allclose(q_rand[:, :32] + q_rand[:, 32:], model.model.layers[0].self_attn.q_proj.weight, atol=1e-6)


def test_non_multiple_width_is_reported():
    model = build("gpt2")
    new, report = widen_hidden(model, 50, probe=ids())
    measured = float((logits(new) - logits(model)).abs().max())
    assert report.max_abs_deviation == pytest.approx(measured, rel=1e-5, abs=1e-7)
    assert any("not a multiple of 32" in n for n in report.notes)
    assert new.transformer.wte.weight.shape == (new.transformer.wte.weight.shape[0], 50)


def test_masks_are_reindexed():
    model = build("gpt2")
    fc, proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[1].mlp.c_proj
    l1_unstructured(fc, "weight", 0.5)  # reads the stream: [32, 48]
    l1_unstructured(proj, "weight", 0.5)  # writes it: [48, 32]
    new, _ = widen_hidden(model, 64)
    new_fc, new_proj = new.transformer.h[0].mlp.c_fc, new.transformer.h[1].mlp.c_proj
    assert torch.equal(new_fc.weight_mask, torch.cat([fc.weight_mask, fc.weight_mask]))
    assert torch.equal(new_proj.weight_mask, torch.cat([proj.weight_mask, proj.weight_mask], 1))
    for m in (new_fc, new_proj):
        assert sparsity.get_mask(m.weight) is m.weight_mask and bool((m.weight[~m.weight_mask] == 0).all())
    assert rel_change(logits(model), logits(new)) <= REL


def test_bad_input():
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="must be larger than the hidden size 32"):
        widen_hidden(model, 32)
    with pytest.raises(ValueError, match="split"):
        widen_hidden(model, 64, split="half")
    with pytest.raises(TypeError, match="new_size must be an int"):
        widen_hidden(model, 64.0)
    assert_untouched(model, snap)


def test_a_model_without_head_outputs_the_old_features_first():
    from transformers import GPT2Model

    model = build("gpt2")
    bare = GPT2Model(model.config).eval()
    new, report = widen_hidden(bare, 64, probe=ids())
    with torch.no_grad():
        a, b = bare(**ids()).last_hidden_state, new(**ids()).last_hidden_state
    assert b.shape[-1] == 64 and torch.allclose(b[..., :32], a, atol=1e-5) and torch.allclose(b[..., 32:], a,
                                                                                           atol=1e-5)
    assert report.max_abs_deviation < 1e-5 and "first 32 of 64" in report.probe
