"""Growth and shrinking of transformer blocks (nnopt.transfer.grow) on GPT-2 (Conv1D), BERT (Linear, MLP over two
modules, post-norm) and Llama (gated MLP, grouped-query attention): function preserved where promised, the input
model untouched, configs consistent, masks carried, tied embeddings tied, bad input refused."""

import pytest
import torch
from torch import nn

from nnopt import sparsity
from nnopt.prune.methods import l1_unstructured
from nnopt.transfer import GraphError, add_heads, insert_block, narrow_mlp, remove_heads, widen_mlp
from tests.transfer._hf import ARCHS, REL, assert_untouched, build, ids, logits, rel_change, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

MLP_OF = {"gpt2": ("transformer.h.{}.mlp.c_fc", "transformer.h.{}.mlp.c_proj"),
          "bert": ("bert.encoder.layer.{}.intermediate.dense", "bert.encoder.layer.{}.output.dense"),
          "llama": ("model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj")}
STACK = {"gpt2": "transformer.h", "bert": "bert.encoder.layer", "llama": "model.layers"}


# --------------------------------------------------------------------------------------- function preservation
@pytest.mark.parametrize("arch", ARCHS)
def test_widen_mlp_keeps_function(arch):
    model = build(arch)
    snap = snapshot(model)
    new, report = widen_mlp(model, 77, generator=torch.Generator().manual_seed(0))
    assert rel_change(logits(model), logits(new)) <= REL
    assert report.relative_deviation <= REL
    assert_untouched(model, snap)
    up, down = MLP_OF[arch]
    for i in range(2):
        w_up = new.get_submodule(up.format(i)).weight
        w_down = new.get_submodule(down.format(i)).weight
        assert 77 in w_up.shape and 77 in w_down.shape
    field = "n_inner" if arch == "gpt2" else "intermediate_size"
    assert getattr(new.config, field) == 77 and report.config == {field: 77}


@pytest.mark.parametrize("arch", ARCHS)
def test_add_heads_keeps_function(arch):
    model = build(arch)
    snap = snapshot(model)
    new, report = add_heads(model, 2)
    assert rel_change(logits(model), logits(new)) <= REL
    assert report.max_abs_deviation == 0.0  # the new heads' output columns are exactly zero
    assert_untouched(model, snap)
    assert new.config.num_attention_heads == 6
    if arch == "llama":  # GQA: one new query head per key-value group, kv projections unchanged
        attn = new.model.layers[0].self_attn
        assert attn.q_proj.out_features == 6 * 8 and attn.k_proj.out_features == 2 * 8
        assert attn.o_proj.in_features == 6 * 8 and attn.num_key_value_groups == 3
        assert new.config.num_key_value_heads == 2
    else:
        assert "from_config would build another model" in " ".join(report.notes)
    # the new heads learn: their output columns get gradient
    new.train()
    new(**ids(), labels=ids()["input_ids"]).loss.backward()
    o = new.get_submodule({"gpt2": "transformer.h.0.attn.c_proj", "llama": "model.layers.0.self_attn.o_proj",
                           "bert": "bert.encoder.layer.0.attention.output.dense"}[arch]).weight
    grad = o.grad.t() if arch == "gpt2" else o.grad  # [out, in] with head features along in
    assert bool((grad[:, -8:] != 0).any())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_insert_block_is_identity(arch, index):
    model = build(arch, perturb=arch != "bert")  # BERT is post-norm: identity only with unit-scale norms
    snap = snapshot(model)
    new, report = insert_block(model, index)
    assert rel_change(logits(model), logits(new)) <= REL
    assert_untouched(model, snap)
    stack = new.get_submodule(STACK[arch])
    assert len(stack) == 3 and new.config.num_hidden_layers == 3
    idx = [m.layer_idx for b in stack for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1, 2]
    if arch != "bert":
        assert report.max_abs_deviation == 0.0


def test_insert_block_post_norm_is_reported():
    model = build("bert")  # perturbed LayerNorm scales and shifts: norm2(norm1(x)) != x
    new, report = insert_block(model, 1, probe=ids())
    assert report.max_abs_deviation > 0
    assert abs(report.max_abs_deviation - float((logits(new) - logits(model)).abs().max())) < 1e-6
    assert any("post-norm" in n for n in report.notes)


def test_insert_block_kv_cache_slots():
    model = build("llama")
    new, _ = insert_block(model, 1)
    x = ids(batch=1, seq=6)
    full = logits(new, x)
    with torch.no_grad():  # prefill then one cached step equals the uncached forward
        out = new(input_ids=x["input_ids"][:, :5], use_cache=True)
        step = new(input_ids=x["input_ids"][:, 5:], cache=out.cache, use_cache=True).logits
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-5)


def test_growth_composes_and_trains():
    model = build("llama")
    new, _ = widen_mlp(model, 64)
    new, _ = add_heads(new, 2)
    new, _ = insert_block(new, 2)
    assert rel_change(logits(model), logits(new)) <= REL
    new.train()
    opt = torch.optim.SGD(new.parameters(), lr=0.1)
    x = ids()["input_ids"]
    first = new(input_ids=x, labels=x).loss
    first.backward()
    opt.step()
    assert new(input_ids=x, labels=x).loss < first


# -------------------------------------------------------------------------------------------------- shrinking
@pytest.mark.parametrize("arch", ARCHS)
def test_narrow_mlp_keeps_most_important(arch):
    model = build(arch)
    snap = snapshot(model)
    keep = torch.tensor([3, 7, 11, 40, 47])

    def chosen(m, mlp):
        s = torch.zeros(mlp.width)
        s[keep] = 1.0
        return s

    new, report = narrow_mlp(model, 5, importance=chosen)
    assert_untouched(model, snap)
    up, down = MLP_OF[arch]
    for i in range(2):
        old_up, new_up = model.get_submodule(up.format(i)), new.get_submodule(up.format(i))
        old_down, new_down = model.get_submodule(down.format(i)), new.get_submodule(down.format(i))
        if arch == "gpt2":  # Conv1D: [in, out]
            assert torch.equal(new_up.weight, old_up.weight[:, keep]) and torch.equal(new_up.bias, old_up.bias[keep])
            assert torch.equal(new_down.weight, old_down.weight[keep]) and new_up.nf == 5 and new_down.nx == 5
        else:
            assert torch.equal(new_up.weight, old_up.weight[keep]) and torch.equal(new_down.weight,
                                                                                  old_down.weight[:, keep])
            assert new_up.out_features == 5 and new_down.in_features == 5
    assert report.relative_deviation > 0
    logits(new)  # runs


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_heads(arch):
    model = build(arch)
    snap = snapshot(model)
    new, report = remove_heads(model, 2)
    assert_untouched(model, snap)
    assert new.config.num_attention_heads == 2
    out = logits(new)
    assert out.shape == logits(model).shape and bool(torch.isfinite(out).all())
    # removing a head whose output columns are zero leaves the function alone: zero two heads, then remove them
    zeroed = build(arch)
    with torch.no_grad():
        o = {"gpt2": lambda m: m.transformer.h[0].attn.c_proj.weight.t(),
             "bert": lambda m: m.bert.encoder.layer[0].attention.output.dense.weight,
             "llama": lambda m: m.model.layers[0].self_attn.o_proj.weight}[arch](zeroed)
        o[:, 0:8].zero_()
        o[:, 24:32].zero_()  # heads 0 and 3 (with GQA: one per kv group)
    new, report = remove_heads(zeroed, 2, layers=[0])
    assert "[0, 3]" in report.changes[0]
    assert rel_change(logits(zeroed), logits(new)) <= REL
    assert report.config == {}  # one block changed: the config cannot say it
    assert any("1 of 2 blocks changed" in n for n in report.notes)


def test_remove_heads_gqa_keeps_groups_equal():
    model = build("llama", heads=8, kv_heads=2)
    new, _ = remove_heads(model, 4)
    attn = new.model.layers[1].self_attn
    assert attn.q_proj.out_features == 4 * 4 and attn.k_proj.out_features == 2 * 4
    assert attn.num_key_value_groups == 2 and new.config.num_attention_heads == 4
    logits(new)


# ------------------------------------------------------------------------------------------ masks and ties
def test_masks_travel_with_their_weights():
    model = build("gpt2")
    fc = model.transformer.h[0].mlp.c_fc
    proj = model.transformer.h[0].attn.c_proj
    l1_unstructured(fc, "weight", 0.5)
    l1_unstructured(proj, "weight", 0.5)
    new, _ = widen_mlp(model, 64, layers=[0])
    new, _ = add_heads(new, 1)
    new, _ = insert_block(new, 0)
    new_fc = new.transformer.h[1].mlp.c_fc
    new_proj = new.transformer.h[1].attn.c_proj
    for m, n_in, n_out in ((new_fc, 32, 64), (new_proj, 40, 32)):
        mask = m.weight_mask
        assert mask.shape == m.weight.shape == (n_in, n_out)
        assert sparsity.get_mask(m.weight) is mask
        assert bool((m.weight[~mask] == 0).all())
    assert torch.equal(new_fc.weight_mask[:, :48], fc.weight_mask)  # old units keep their masks
    assert bool(new_proj.weight_mask[32:].all())  # the new head's columns are dense (and zero)
    # the copied block at 0 carries a copy of block 0's masks
    assert torch.equal(new.transformer.h[0].mlp.c_fc.weight_mask, new_fc.weight_mask)


@pytest.mark.parametrize("op", [lambda m: widen_mlp(m, 60), lambda m: add_heads(m, 1),
                                lambda m: insert_block(m, 1), lambda m: narrow_mlp(m, 20),
                                lambda m: remove_heads(m, 1)])
def test_tied_embeddings_stay_tied(op):
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    new, _ = op(model)
    assert new.lm_head.weight is new.transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda m: widen_mlp(m, 48), "must be larger than the intermediate size 48 of 'model.layers.0.mlp'"),
    (lambda m: widen_mlp(m, 10), "must be larger"),
    (lambda m: narrow_mlp(m, 48), "must be smaller"),
    (lambda m: remove_heads(m, 4), "cannot remove 4 heads from 'model.layers.0.self_attn', which has 4"),
    (lambda m: remove_heads(m, 1), "multiple of the 2 key-value groups"),
    (lambda m: add_heads(m, 3), "cannot be spread evenly over the 2 key-value groups"),
    (lambda m: insert_block(m, 3), "index 3 out of range for 'model.layers': 0 to 2"),
    (lambda m: insert_block(m, -1), "out of range"),
    (lambda m: widen_mlp(m, 60, layers=[5]), "layer index 5 out of range for 'model.layers'"),
    (lambda m: narrow_mlp(m, 4, importance="l7"), "importance must be one of"),
    (lambda m: widen_mlp(m, 60.5), "new_size must be an int"),
])
def test_bad_input_leaves_model_unchanged(call, match):
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)
    assert_untouched(model, snap)


class _Reshaping(nn.Module):
    """An MLP whose intermediate features are reshaped: not per-feature, so Net2Net cannot follow it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc(x).relu()
        return self.out(h.flip(-1))


class _Plain(_Reshaping):
    """A per-feature chain written with functional calls and scalar arithmetic."""

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.fc(x)) * 2.0)


class _Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp()

    def forward(self, x):
        return x + self.mlp(x)


class _Net(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(mlp), _Block(mlp)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_untraceable_rule_names_the_node():
    model = _Net(_Reshaping)
    with pytest.raises(GraphError, match=r"(?s)no MLP found in 'blocks.0'.*node 'flip'") as info:
        widen_mlp(model, 20, probe=torch.randn(2, 8))
    assert "blocks.0.mlp" in str(info.value)


class _Branching(_Reshaping):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = h.relu()
        return self.out(h)


class _Scaled(_Reshaping):
    """Intermediate features times a learned per-feature vector: a parameter Net2Net would have to replicate."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return self.out(self.fc(x).relu() * self.scale)


def test_parameters_between_the_linears_are_refused():
    model = _Net(_Scaled)
    with pytest.raises(GraphError, match=r"(?s)blocks.0.mlp: node 'mul' \(call_function mul\) is not a per-feature"):
        widen_mlp(model, 20, probe=torch.randn(2, 8))


def test_untraceable_mlp_is_refused_naming_the_module():
    model = _Net(_Branching)
    with pytest.raises(GraphError, match=r"(?s)no MLP found in 'blocks.0'.*blocks.0.mlp: torch.fx cannot trace it"):
        narrow_mlp(model, 8, probe=torch.randn(2, 8))


def test_plain_pytorch_block_is_grown():
    model = _Net(_Plain)
    x = torch.randn(3, 8)
    new, report = widen_mlp(model, 24, probe=x)
    assert new.blocks[1].mlp.fc.out_features == 24 and model.blocks[1].mlp.fc.out_features == 16
    assert torch.allclose(new(x), model(x), atol=1e-6) and report.max_abs_deviation < 1e-6


# --------------------------------------------------------------------------------------- taylor importance
def _gated_head_importance(model, o_name, heads, d, data):
    """Michel et al.'s head importance computed independently: a gate per (sequence, head) multiplies the heads'
    outputs before the output projection; |dL/dgate| summed over sequences."""
    gates = []

    def pre(m, args):
        x = args[0]
        g = torch.ones(x.shape[0], 1, heads, requires_grad=True)
        gates.append(g)
        return (x * g.repeat_interleave(d, dim=-1),)

    h = model.get_submodule(o_name).register_forward_pre_hook(pre)
    try:
        out = model(**data)
        (grad,) = torch.autograd.grad(out.loss, gates)
    finally:
        h.remove()
    return grad.abs().sum((0, 1))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_taylor_head_importance_matches_gated_gradient(arch):
    from nnopt.transfer._graph import find_attention
    from nnopt.transfer.grow import _head_scores, _taylor

    model = build(arch)
    x = ids(batch=3, seq=7)
    data = {"input_ids": x["input_ids"], "labels": x["input_ids"]}
    block = STACK[arch] + ".1"
    att = find_attention(model, block)
    got = _head_scores(model, att, "taylor", None, _taylor(model, [att.o], data))
    want = _gated_head_importance(model, att.o, att.heads, att.head_dim, data)
    assert torch.allclose(got.float(), want, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the parameters get no gradient
    if arch == "gpt2":  # MHA: the two heads with the smallest gate gradients go
        new, report = remove_heads(model, 2, layers=[1], importance="taylor", data=[data, data])
        assert str(sorted(torch.sort(want).indices[:2].tolist())) in report.changes[0]


def test_taylor_mlp_importance_keeps_the_units_whose_removal_costs_least():
    model = build("gpt2", ff=12)
    x = ids(batch=4, seq=9)
    data = {"input_ids": x["input_ids"], "labels": x["input_ids"]}
    with torch.no_grad():
        base = model(**data).loss
    cost = []
    for j in range(12):  # the actual loss change of removing each unit alone, against the first-order estimate
        keep = torch.ones(12)
        keep[j] = 0
        new, _ = narrow_mlp(model, 11, layers=[0], importance=lambda m, mlp, k=keep: k)
        with torch.no_grad():
            cost.append(float((new(**data).loss - base).abs()))
    new, report = narrow_mlp(model, 11, layers=[0], importance="taylor", data=data)
    with torch.no_grad():
        taylor_cost = float((new(**data).loss - base).abs())
    assert taylor_cost <= sorted(cost)[len(cost) // 2]  # better than the median single-unit removal
    with pytest.raises(ValueError, match="needs data="):
        narrow_mlp(model, 11, importance="taylor")
    with pytest.raises(TypeError, match="has no loss"):
        narrow_mlp(model, 11, importance="taylor", data={"input_ids": x["input_ids"]})


def test_widen_mlp_noise_breaks_symmetry_and_reports_the_change():
    model = build("llama")
    new, report = widen_mlp(model, 60, noise=0.1, generator=torch.Generator().manual_seed(0), probe=ids())
    assert report.max_abs_deviation == pytest.approx(float((logits(new) - logits(model)).abs().max()), rel=1e-5)
    assert 0 < report.relative_deviation < 0.5 and any("noise" in n for n in report.notes)
    up = new.model.layers[0].mlp.up_proj.weight
    old = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(up[:48], old)  # the old units are untouched
    with pytest.raises(ValueError, match="noise"):
        widen_mlp(model, 60, noise=-1.0)


def test_sequential_api_points_transformer_users_to_the_block_operators():
    from nnopt.transfer import widen

    model = build("bert")
    with pytest.raises(ValueError, match=r"not a child of an nn.Sequential.*widen_mlp"):
        widen(model, "bert.encoder.layer.0.intermediate.dense", 64)


def test_gqa_groups_added_and_removed_whole():
    model = build("llama", heads=8, kv_heads=2)  # 2 groups of 4 query heads, head size 4
    snap = snapshot(model)
    new, report = add_heads(model, 1, by="group")
    attn = new.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (12 * 4, 3 * 4, 3 * 4)
    assert attn.num_key_value_groups == 4 and new.config.num_key_value_heads == 3
    assert new.config.num_attention_heads == 12 and report.max_abs_deviation == 0.0
    assert_untouched(model, snap)

    def second_group_weak(m, att):
        return torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])

    new, report = remove_heads(model, 1, by="group", importance=second_group_weak)
    attn, old = new.model.layers[1].self_attn, model.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, old.q_proj.weight[:16]) and torch.equal(attn.k_proj.weight,
                                                                                 old.k_proj.weight[:4])
    assert torch.equal(attn.o_proj.weight, old.o_proj.weight[:, :16]) and attn.num_key_value_groups == 4
    assert new.config.num_key_value_heads == 1 and "[4, 5, 6, 7]" in report.changes[0]
    logits(new)
    with pytest.raises(ValueError, match="cannot remove 2 key-value groups"):
        remove_heads(model, 2, by="group")
    with pytest.raises(ValueError, match="by must be 'query' or 'group'"):
        add_heads(model, 1, by="kv")
