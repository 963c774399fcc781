"""nnopt.nn: the masked linear layer and its functional form, every backend against the dense reference.

The kernels themselves are tested product by product in tests/kernels/test_masked_linear.py; here: autograd
through the layer (forward and all three gradients, 2-D and 3-D inputs, bias or not), auto's choice, the layout
cache, module conversions, training with nnopt optimizers, torch.compile, opcheck and bad input.
"""

import copy

import pytest
import torch

import nnopt.nn as nnn
import nnopt.optim as nno
from nnopt.nn import dispatch
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

BACKENDS = ["auto", "cpu", "triton", "torch"]


def _skip(backend, device="cpu"):
    if backend != "auto":
        skip_unless_available(backend, device, "masked_linear")


def block_mask(n, k, block, keep, seed=0):
    """A mask whose block×block tiles are kept with probability ``keep``, with one partly filled tile."""
    g = torch.Generator().manual_seed(seed)
    nb, kb = -(-n // block), -(-k // block)
    tiles = torch.rand(nb, kb, generator=g) < keep
    mask = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k].clone()
    mask[: block // 2, : block // 3] = True
    mask[1, 0] = False
    return mask


MASKS = {
    "empty": lambda n, k: torch.zeros(n, k, dtype=torch.bool),
    "full": lambda n, k: torch.ones(n, k, dtype=torch.bool),
    "one_tile": lambda n, k: torch.zeros(n, k, dtype=torch.bool).index_fill_(0, torch.tensor([n - 1]), True),
    "blocks": lambda n, k: block_mask(n, k, 16, 0.3),
    "unstructured": lambda n, k: torch.rand(n, k) < 0.2,
}


def reference(x, weight, mask, bias):
    """The dense oracle in float64 on detached copies: (y, dx, dW, db) for the loss sum(y * g)."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    y = torch.nn.functional.linear(x64, torch.where(mask, w64, torch.zeros((), dtype=torch.float64)), b64)
    return y, x64, w64, b64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("lead,bias", [((7,), True), ((2, 5), False), ((1,), True)])
def test_functional_forward_and_gradients(backend, mask_kind, lead, bias):
    _skip(backend)
    n, k = 70, 45  # not multiples of the 16×16 blocks
    mask = MASKS[mask_kind](n, k)
    weight = torch.randn(n, k).masked_fill(~mask, 3.0).requires_grad_()  # masked entries nonzero: ignored
    b = torch.randn(n, requires_grad=True) if bias else None
    x = torch.randn(*lead, k, requires_grad=True)
    y = nnn.functional.masked_linear(x, weight, mask, b, backend, block_size=(16, 16))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ry, x64, w64, b64 = reference(x, weight, mask, b)
    (ry * g.double()).sum().backward()
    assert y.shape == (*lead, n)
    assert_close(y, ry.float(), reduction_length=k)
    assert_close(x.grad, x64.grad.float(), reduction_length=n)
    assert_close(weight.grad, w64.grad.float(), reduction_length=x.numel() // k)
    assert (weight.grad[~mask] == 0).all()
    if bias:
        assert_close(b.grad, b64.grad.float(), reduction_length=x.numel() // k)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bf16(backend):
    _skip(backend)
    mask = block_mask(64, 96, 32, 0.4)
    weight = torch.randn(64, 96, dtype=torch.bfloat16)
    x = torch.randn(9, 96, dtype=torch.bfloat16)
    y = nnn.functional.masked_linear(x, weight, mask, None, backend)
    ry = reference(x, weight, mask, None)[0]
    assert y.dtype == torch.bfloat16
    assert_close(y, ry.to(torch.bfloat16), reduction_length=96)


def test_auto_chooses_dense_when_sparsity_does_not_pay_and_sparse_when_it_does():
    skip_unless_available("cpu", "cpu", "masked_linear")
    w = torch.empty(512, 512)
    dense_mask = block_mask(512, 512, 32, 0.9)
    sparse_mask = block_mask(512, 512, 32, 0.05)
    unstructured = torch.rand(512, 512) < 0.1  # 90% sparse but every tile non-empty
    pick = lambda mask: dispatch.choose(dispatch.cached_layout(mask), 256, w, "auto")  # noqa: E731
    assert pick(dense_mask) is dispatch.backends.implementation("masked_linear", "torch")
    assert pick(unstructured) is dispatch.backends.implementation("masked_linear", "torch")
    assert pick(torch.ones(512, 512, dtype=torch.bool)) is dispatch.DENSE_MASKED  # nothing to mask
    assert pick(sparse_mask) is dispatch.backends.implementation("masked_linear", "cpu")


def test_layout_cache_follows_the_mask():
    mask = block_mask(64, 64, 32, 0.5)
    first = dispatch.cached_layout(mask)
    assert dispatch.cached_layout(mask) is first
    mask[0, 0] = not bool(mask[0, 0])  # in place: the version changes
    second = dispatch.cached_layout(mask)
    assert second is not first
    assert dispatch.cached_layout(mask, 16, 16) is not second


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_layer_sees_a_changed_mask(backend):
    _skip(backend)
    layer = nnn.MaskedLinear(40, 50, mask=block_mask(50, 40, 16, 0.5), block_size=(16, 16), backend=backend)
    x = torch.randn(6, 40)
    layer(x)
    new = block_mask(50, 40, 16, 0.5, seed=1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(50, 40))
    layer.set_mask(new)
    assert (layer.weight[~new] == 0).all()
    assert_close(layer(x), reference(x, layer.weight, new, layer.bias)[0].float(), reduction_length=40)


def test_from_linear_to_linear_and_convert_unconvert_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10),
                                torch.nn.Sequential(torch.nn.Linear(10, 10)))
    x = torch.randn(4, 20)
    before = model(x)
    keys = set(model.state_dict())
    nnn.convert(model, exclude=["3.*"])
    assert isinstance(model[0], nnn.MaskedLinear) and isinstance(model[0], torch.nn.Linear)
    assert type(model[3][0]) is torch.nn.Linear  # excluded by name
    assert set(model.state_dict()) == keys | {"0.weight_mask", "2.weight_mask"}
    assert torch.equal(model(x), before)
    nnn.unconvert(model)
    assert type(model[0]) is torch.nn.Linear and torch.equal(model(x), before)

    linear = torch.nn.Linear(32, 48)
    mask = block_mask(48, 32, 16, 0.5)
    layer = nnn.MaskedLinear.from_linear(linear, mask, block_size=(16, 16))
    assert layer.weight is linear.weight and (linear.weight[~mask] == 0).all()
    y = layer(torch.randn(3, 32))
    back = layer.to_linear()
    assert type(back) is torch.nn.Linear
    assert torch.equal(back.weight_mask, mask)  # the mask stays in force under nnopt.prune's contract
    again = nnn.MaskedLinear.from_linear(back, block_size=(16, 16))
    assert torch.equal(again.weight_mask, mask)
    torch.testing.assert_close(again(torch.randn(3, 32)).shape, y.shape)


def test_state_dict_round_trip_keeps_mask_and_zeros():
    mask = block_mask(24, 40, 8, 0.5)
    a = nnn.MaskedLinear(40, 24, mask=mask)
    b = nnn.MaskedLinear(40, 24)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight_mask, mask) and torch.equal(a.weight, b.weight)
    x = torch.randn(5, 40)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("optimizer", ["nnopt", "torch"])
def test_training_a_pruned_mlp_keeps_pruned_entries_zero(optimizer):
    skip_unless_available("cpu", "cpu", "masked_linear")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    nnn.convert(model)
    masks = [block_mask(128, 64, 32, 0.25), block_mask(10, 128, 32, 0.5, seed=3)]
    for layer, mask in zip((model[0], model[2]), masks):
        layer.set_mask(mask)
        layer.backend = "cpu"
    opt_cls = nno.AdamW if optimizer == "nnopt" else torch.optim.AdamW
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for layer, mask in zip((model[0], model[2]), masks):
        assert (layer.weight[~mask] == 0).all()
        assert (opt.state[layer.weight]["exp_avg"][~mask] == 0).all()


def test_matches_dense_training_of_the_same_pruned_mlp():
    """The block-sparse layer trains exactly like the dense reference with the same masks."""
    skip_unless_available("cpu", "cpu", "masked_linear")
    base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 10))
    twins = [nnn.convert(copy.deepcopy(base)) for _ in range(2)]
    masks = [block_mask(96, 64, 32, 0.3), block_mask(10, 96, 32, 0.6, seed=2)]
    for model, backend in zip(twins, ("cpu", "torch")):
        for layer, mask in zip((model[0], model[2]), masks):
            layer.set_mask(mask)
            layer.backend = backend
    opts = [nno.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in twins]
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    for _ in range(5):
        for model, opt in zip(twins, opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(twins[0].parameters(), twins[1].parameters()):
        assert_close(a.detach(), b.detach(), reduction_length=128)


def test_torch_compile_traces_the_layer():
    skip_unless_available("cpu", "cpu", "masked_linear")
    layer = nnn.MaskedLinear(64, 64, mask=block_mask(64, 64, 32, 0.5), backend="cpu")
    x = torch.randn(8, 64, requires_grad=True)
    layer(x)  # the eager call chooses the implementation and builds the layout the compiled graph uses
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert_close(y, layer(x), reduction_length=64)
    assert (layer.weight.grad[~layer.weight_mask] == 0).all()


def test_opcheck_every_op():
    skip_unless_available("cpu", "cpu", "masked_linear")
    mask = block_mask(40, 48, 16, 0.5)
    lay = nnn.BlockLayout(mask, 16, 16)
    x, w, dy, b = torch.randn(5, 48), torch.randn(40, 48), torch.randn(5, 40), torch.randn(40)
    ops = torch.ops.nnopt
    torch.library.opcheck(ops.masked_linear, (x, w, mask, b, lay.row_ptr, lay.col_idx, lay.full, 16, 16))
    torch.library.opcheck(ops.masked_linear_dx, (dy, w, mask, lay.col_ptr, lay.row_idx, lay.t_perm, lay.full, 16, 16))
    torch.library.opcheck(ops.masked_linear_dw, (dy, x, mask, lay.row_ptr, lay.col_idx, lay.full, 16, 16))


def test_bad_input_names_the_argument():
    w, m = torch.randn(6, 4), torch.ones(6, 4, dtype=torch.bool)
    f = nnn.functional.masked_linear
    with pytest.raises(ValueError, match="mask has shape"):
        f(torch.randn(2, 4), w, torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        f(torch.randn(2, 4), w, m.float())
    with pytest.raises(ValueError, match="mask is on meta"):
        f(torch.randn(2, 4), w, m.to("meta"))
    with pytest.raises(ValueError, match="input has 5 features"):
        f(torch.randn(2, 5), w, m)
    with pytest.raises(ValueError, match="bias has shape"):
        f(torch.randn(2, 4), w, m, torch.randn(5))
    with pytest.raises(TypeError, match="MaskedLinear: mask must be a bool tensor"):
        nnn.MaskedLinear(4, 6, mask=torch.ones(6, 4))
    with pytest.raises(ValueError, match="MaskedLinear: mask has shape"):
        nnn.MaskedLinear(4, 6, mask=torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(dispatch.backends.BackendUnavailable, match="backend 'cuda' is unavailable"):
        f(torch.randn(2, 4), w, m, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_layer_on_cuda(dtype, backend):
    """On a GPU: the layer (auto and forced triton) in bf16/fp16/fp32 against the float64 reference, forward and
    all gradients, 3-D input, a 90%-block-sparse mask with partial tiles; pruned gradient entries exactly 0."""
    mask = block_mask(300, 200, 32, 0.1).cuda()
    layer = nnn.MaskedLinear(200, 300, mask=mask, device="cuda", dtype=dtype, backend=backend)
    x = torch.randn(3, 70, 200, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ry, x64, w64, b64 = reference(x, layer.weight, mask, layer.bias)
    (ry * g.double()).sum().backward()
    assert_close(y, ry.to(dtype), reduction_length=200)
    assert_close(x.grad, x64.grad.to(dtype), reduction_length=300)
    assert_close(layer.weight.grad, w64.grad.to(dtype), reduction_length=210)
    assert (layer.weight.grad[~mask] == 0).all()


@pytest.mark.gpu
def test_2_4_inference_on_cuda():
    """On a GPU with 2:4 sparse tensor cores: a 2:4 mask at inference in fp16 runs on torch's semi-structured
    sparse tensors (auto) and matches the dense reference."""
    n, k = 256, 512
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda")
    mask[..., :2] = True
    mask = mask.reshape(n, k)
    layer = nnn.MaskedLinear(k, n, mask=mask, device="cuda", dtype=torch.float16).eval()
    x = torch.randn(128, k, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        assert dispatch.choose(dispatch.cached_layout(mask), 128, layer.weight, "auto") is dispatch.SEMI_STRUCTURED
        y = layer(x)
    assert_close(y, reference(x, layer.weight, mask, layer.bias)[0].half(), reduction_length=k)


# -- regressions found in review -------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [8, 512])  # dense path and sparse path
def test_autocast_casts_like_linear(m):
    skip_unless_available("cpu", "cpu", "masked_linear")
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    nnn.convert(model, include=["2"])
    model[2].set_mask(block_mask(128, 256, 32, 0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(m, 256))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert (model[2].weight.grad[~model[2].weight_mask] == 0).all()


def test_non_contiguous_mask_at_inference():
    skip_unless_available("cpu", "cpu", "masked_linear")
    mask_t = block_mask(96, 64, 32, 0.3)  # [K, N]: the layer gets its transpose
    layer = nnn.MaskedLinear(96, 64, mask=mask_t.t(), backend="cpu")
    x = torch.randn(10, 96)
    with torch.no_grad():
        y = layer(x)
    assert_close(y, reference(x, layer.weight, mask_t.t(), layer.bias)[0].float(), reduction_length=96)
    y2 = nnn.functional.masked_linear(x, layer.weight.detach(), mask_t.t(), None, "cpu")
    assert_close(y2, reference(x, layer.weight, mask_t.t(), None)[0].float(), reduction_length=96)


def test_in_place_mask_edit_keeps_dense_and_sparse_paths_equal():
    skip_unless_available("cpu", "cpu", "masked_linear")
    layer = nnn.MaskedLinear(64, 64, mask=block_mask(64, 64, 32, 0.5))
    layer(torch.randn(2, 64))
    layer.weight_mask[0, :] = False  # in place: the layer must re-zero the weight before its next call
    x = torch.randn(4, 64)
    want = reference(x, layer.weight, layer.weight_mask, layer.bias)[0].float()
    for backend in ("auto", "cpu", "torch"):
        layer.backend = backend
        assert_close(layer(x), want, reduction_length=64)
    assert (layer.weight[~layer.weight_mask] == 0).all()


def test_from_linear_takes_over_the_pruning_so_regrown_entries_train():
    import nnopt.prune as prune

    lin = torch.nn.Linear(64, 32)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    old = lin.weight_mask.clone()
    layer = nnn.convert(torch.nn.Sequential(lin))[0]
    assert torch.equal(layer.weight_mask, old)
    layer.set_mask(torch.ones(32, 64, dtype=torch.bool))  # regrow everything
    layer(torch.randn(8, 64)).sum().backward()
    assert (layer.weight.grad[~old] != 0).any()


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_zero_sized_features(shape):
    layer = nnn.MaskedLinear(*shape)
    y = layer(torch.randn(3, shape[0]))
    assert y.shape == (3, shape[1])


def test_layer_dense_path_matches_reference():
    """auto's dense path for a layer (weight holding its zeros: F.linear, dW masked in place) against float64."""
    layer = nnn.MaskedLinear(45, 70, mask=torch.rand(70, 45) < 0.5)  # unstructured: every tile non-empty
    x = torch.randn(2, 7, 45, requires_grad=True)
    assert dispatch.choose(dispatch.cached_layout(layer.weight_mask), 14, layer.weight, "auto",
                           True) is dispatch.DENSE_MASKED
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ry, x64, w64, b64 = reference(x, layer.weight, layer.weight_mask, layer.bias)
    (ry * g.double()).sum().backward()
    assert_close(y, ry.float(), reduction_length=45)
    assert_close(x.grad, x64.grad.float(), reduction_length=70)
    assert_close(layer.weight.grad, w64.grad.float(), reduction_length=14)
    assert_close(layer.bias.grad, b64.grad.float(), reduction_length=14)
    assert (layer.weight.grad[~layer.weight_mask] == 0).all()


def test_copies_relink_their_mask_in_forward():
    """MaskedLinear keeps the prune contract's link as an attribute its forward calls (no forward pre-hook): a
    deepcopy and a pickle round trip link their own weight to their own mask on the first forward, the contract's
    functions find the link, and remove_mask still makes the pruning permanent."""
    import io

    from nnopt import sparsity
    from nnopt.prune import _contract

    layer = nnn.MaskedLinear.from_linear(torch.nn.Linear(64, 32), block_mask(32, 64, 32, 0.5))
    assert not layer._forward_pre_hooks and _contract.pruned_names(layer) == ["weight"]
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        x = torch.randn(3, 64)
        assert_close(twin(x), layer(x), reduction_length=64)
        assert sparsity.get_mask(twin.weight) is twin.weight_mask
        assert _contract.pruned_names(twin) == ["weight"]
    _contract.remove_mask(layer, "weight")
    assert _contract.pruned_names(layer) == [] and sparsity.get_mask(layer.weight) is None
