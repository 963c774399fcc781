"""convert / unconvert on real transformers models (GPT-2 with its Conv1D layers, Llama with nn.Linear), built from
configs with random init (nnopt.demo.lm, no download).

Every projection is pruned to random 16×16 tiles (nnopt.prune.custom_from_mask, a Conv1D's mask in its [in, out]
storage); the converted model must give the pruned dense model's logits (fp32, 1e-5 relative) on the batch path
and on the decode path (KV-cached greedy steps under no_grad), train with the pruned entries held at exactly zero,
and unconvert to the original classes with the original state_dict keys. Bad input leaves the model untouched.
"""

import copy
import inspect

import pytest
import torch

import nnopt.nn as nnn
from nnopt import layers
from nnopt.prune import methods

transformers = pytest.importorskip("transformers")
from nnopt.demo import lm  # noqa: E402
from nnopt.nn.masked_conv1d import MaskedConv1D  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["gpt2", "llama"]


def tile_mask(module, block=16, keep=0.4, seed=0):
    """A mask of random block × block tiles over (out, in) features, in the weight's storage shape."""
    n_in, n_out = layers.in_out_features(module)
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.rand(-(-n_out // block), -(-n_in // block), generator=gen) < keep
    mask = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n_out, :n_in]
    return (mask.t() if layers.is_conv1d(module) else mask).contiguous()


def pruned_model(kind, seed=0):
    model = lm.build(kind, d_model=64, n_layers=2, n_heads=4, seq_len=64, seed=seed)
    for i, (name, module) in enumerate(layers.linear_modules(model)):
        if name != "lm_head":
            methods.custom_from_mask(module, "weight", tile_mask(module, seed=i))
    return model


def step(model, ids, cache):
    """One forward against a KV cache (transformers >= 5.x names the argument ``cache``)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(ids, use_cache=True, **{name: cache})


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_converted_model_gives_the_dense_logits_and_round_trips(kind):
    model = pruned_model(kind)
    dense = copy.deepcopy(model)
    keys = list(model.state_dict())
    ids = torch.randint(0, 256, (2, 24))
    nnn.convert(model, exclude=["lm_head"], block_size=(16, 16), backend="cpu")
    twins = [m for m in model.modules() if isinstance(m, nnn.masked_linear.MaskedLayerMixin)]
    assert len(twins) == (8 if kind == "gpt2" else 14)
    if kind == "gpt2":
        assert all(isinstance(m, MaskedConv1D) and layers.is_conv1d(m) for m in twins)
    assert set(model.state_dict()) == set(keys)  # the pruned layers' masks were there already
    with torch.no_grad():
        want = dense(ids).logits
        assert relative(model(ids).logits, want) <= 1e-5
        # decode: one token at a time against a KV cache (B = 2 rows per call: the packed path)
        cache = transformers.DynamicCache()
        out = step(model, ids[:, :20], cache)
        steps = [out.logits[:, -1]]
        for t in range(20, 24):
            out = step(model, ids[:, t:t + 1], cache)
            steps.append(out.logits[:, -1])
    assert all(m._decode_plan[2][0] is not None for m in twins)
    for got, t in zip(steps, range(19, 24)):
        assert relative(got, want[:, t]) <= 1e-5
    nnn.unconvert(model)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, nnn.masked_linear.MaskedLayerMixin) for m in model.modules())
    with torch.no_grad():
        assert relative(model(ids).logits, want) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_converted_model_trains_with_the_zeros_held(kind):
    model = pruned_model(kind)
    nnn.convert(model, exclude=["lm_head"], block_size=(16, 16), backend="cpu")
    masks = {name: m.weight_mask.clone() for name, m in model.named_modules()
             if isinstance(m, nnn.masked_linear.MaskedLayerMixin)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 32))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert (modules[name].weight[~mask] == 0).all(), name
        assert modules[name].weight[mask].abs().sum() > 0


def test_conv1d_twin_round_trip_and_state_dict():
    conv = transformers.pytorch_utils.Conv1D(48, 40)  # nf = 48 out, nx = 40 in: weight [40, 48]
    mask = tile_mask(conv)
    twin = MaskedConv1D.from_conv1d(conv, mask, block_size=(16, 16), backend="cpu")
    assert twin.weight is conv.weight and (conv.weight[~mask] == 0).all()
    x = torch.randn(3, 5, 40)
    want = x @ (conv.weight * mask) + conv.bias
    torch.testing.assert_close(twin(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(twin(x[:1, :1]), want[:1, :1], rtol=1e-5, atol=1e-5)
    other = MaskedConv1D(48, 40, block_size=(16, 16))
    other.load_state_dict(twin.state_dict())
    assert torch.equal(other.weight_mask, mask) and torch.equal(other.weight, twin.weight)
    back = twin.to_conv1d()
    assert type(back) is transformers.pytorch_utils.Conv1D and set(back.state_dict()) == {"weight", "bias",
                                                                                             "weight_mask"}


def test_convert_errors_name_the_layer_and_leave_the_model_untouched():
    with pytest.raises(ValueError, match="Sequential has no nn.Linear or transformers Conv1D layer"):
        nnn.convert(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="matching include/exclude"):
        nnn.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), include=["nothing"])
    model = pruned_model("gpt2")
    layer = model.transformer.h[1].mlp.c_fc
    layer._buffers["weight_mask"] = layer.weight_mask.float()  # a corrupted mask: wrong dtype
    types_before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="convert: layer 'transformer.h.1.mlp.c_fc'.*mask must be a bool tensor"):
        nnn.convert(model)
    assert [type(m) for m in model.modules()] == types_before  # nothing replaced, not even the earlier layers
    with pytest.raises(TypeError, match="unexpected arguments"):
        nnn.convert(pruned_model("llama"), blocksize=(16, 16))


def test_bf16_weights_with_a_float_mask_on_another_device_raise_naming_the_layer():
    linear = torch.nn.Linear(32, 16).to(torch.bfloat16)
    with pytest.raises(TypeError, match="MaskedLinear: mask must be a bool tensor, got torch.float32 .*weight"):
        nnn.MaskedLinear.from_linear(linear, torch.ones(16, 32, device="meta"))
    with pytest.raises(ValueError, match="MaskedLinear: mask is on meta, weight on cpu"):
        nnn.MaskedLinear.from_linear(linear, torch.ones(16, 32, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="MaskedLinear: mask has shape"):
        nnn.MaskedLinear.from_linear(linear, torch.ones(32, 16, dtype=torch.bool))
    assert "weight_mask" not in linear._buffers  # untouched
