"""compact_states=True: states only for the entries a mask keeps. Same parameters as full states (fp32/bf16:
exactly; 8/4-bit: exactly those of a full-state optimizer on the packed vectors), zeros under masks, remapping
when the mask changes (regrown entries start at zero), the index codec, bytes per parameter, checkpoints, and bad
input.
"""

import warnings

import pytest
import torch

import nnopt.optim as nno
from nnopt import sparsity
from nnopt.optim._compact_state import decode_index, encode_index, index_bytes_bound
from tests.conftest import skip_unless_available

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = [("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2)), ("AdamW", dict(lr=1e-2, amsgrad=True)),
        ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.1)), ("RMSprop", dict(lr=1e-2, momentum=0.5,
                                                                                    centered=True))]
SHAPES = [(70, 91), (5000,)]


def masked_params(density=0.3, shapes=SHAPES):
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s))
        sparsity.set_mask(p, torch.rand(s) < density)
        ps.append(p)
    return ps


def twin(ps):
    qs = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        sparsity.set_mask(q, sparsity.get_mask(p).clone())
        qs.append(q)
    return qs


def set_grads(*lists):
    for ps in zip(*lists):
        g = torch.randn_like(ps[0])
        for p in ps:
            p.grad = g.clone()


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 0.5, 1.0])
def test_index_codec_round_trips(density):
    for n in (1, 14, 15, 16, 31, 1000):
        m = torch.rand(n) < density
        idx = encode_index(m)
        assert idx.dtype == torch.uint8 and idx.numel() <= index_bytes_bound(n, int(m.sum()))
        assert torch.equal(decode_index(idx), m.nonzero().reshape(-1))
    m = torch.zeros(100, dtype=torch.bool)
    m[[0, 15, 16, 99]] = True  # gaps 0, 14, 0 and 82 (escapes)
    assert torch.equal(decode_index(encode_index(m)), torch.tensor([0, 15, 16, 99]))


@pytest.mark.parametrize("name,kw", OPTS)
@pytest.mark.parametrize("bits", [32, 16])
def test_same_parameters_as_full_states(name, kw, bits):
    ps = masked_params()
    qs = twin(ps)
    full = getattr(nno, name)(ps, state_bits=bits, min_quant_size=0, **kw)
    compact = getattr(nno, name)(qs, state_bits=bits, min_quant_size=0, compact_states=True, **kw)
    for _ in range(3):
        set_grads(ps, qs)
        full.step()
        compact.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert (q[~sparsity.get_mask(q)] == 0).all()


@pytest.mark.parametrize("name,kw", OPTS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_equals_full_states_on_packed_vectors(name, kw, bits):
    """With 8/4-bit states the blocks run over the packed vector: a full-state optimizer on the packed entries
    (no mask) gives exactly the same parameters and codes."""
    ps = masked_params()
    packed = [torch.nn.Parameter(p.detach()[sparsity.get_mask(p)].clone()) for p in ps]
    compact = getattr(nno, name)(ps, state_bits=bits, min_quant_size=0, compact_states=True, **kw)
    dense = getattr(nno, name)(packed, state_bits=bits, min_quant_size=0, **kw)
    for _ in range(3):
        for p, k in zip(ps, packed):
            g = torch.randn_like(p)
            p.grad = g
            k.grad = g[sparsity.get_mask(p)].clone()
        compact.step()
        dense.step()
    for p, k in zip(ps, packed):
        m = sparsity.get_mask(p)
        assert torch.equal(p[m], k)
        assert (p[~m] == 0).all()
        for key, v in dense.state[k].items():
            assert torch.equal(compact.state[p][key].reshape(-1), v.reshape(-1)), key


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bits", [32, 8])
def test_backends_match_cpu(backend, bits):
    skip_unless_available(backend, "cpu", "quant_optim" if bits < 32 else "fused_optim")
    ps = masked_params(0.3, [(40, 37)])
    qs = twin(ps)
    a = nno.AdamW(ps, lr=1e-2, state_bits=bits, min_quant_size=0, compact_states=True, backend="cpu")
    b = nno.AdamW(qs, lr=1e-2, state_bits=bits, min_quant_size=0, compact_states=True, backend=backend)
    for _ in range(2):
        set_grads(ps, qs)
        a.step()
        b.step()
    assert torch.allclose(ps[0], qs[0], rtol=1e-5, atol=1e-6)
    assert (qs[0][~sparsity.get_mask(qs[0])] == 0).all()


@pytest.mark.parametrize("bits", [32, 8])
def test_mask_change_regrown_start_at_zero(bits):
    p = torch.nn.Parameter(torch.randn(64, 80))
    m0 = torch.rand(64, 80) < 0.5
    sparsity.set_mask(p, m0)
    opt = nno.AdamW([p], lr=1e-2, state_bits=bits, min_quant_size=0, compact_states=True)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    old = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    m1 = m0.clone()
    flip = torch.rand(64, 80) < 0.2
    m1[flip] = ~m1[flip]
    for mode in ("new object", "in place"):
        if mode == "new object":
            sparsity.set_mask(p, m1)
        else:
            m1 = torch.rand(64, 80) < 0.5
            sparsity.get_mask(p).copy_(m1)
            sparsity.zero_pruned_(p.data, m1)
        before = opt.state[p]["kept_index"]
        old_pos = decode_index(before)
        p.grad = torch.zeros_like(p)  # zero gradient: a regrown entry's moments stay exactly zero
        opt.step()
        st = opt.state[p]
        pos = decode_index(st["kept_index"])
        assert torch.equal(pos, m1.reshape(-1).nonzero().reshape(-1))
        exp_avg = nno._quant_state.read_float(st, "exp_avg", nno._quant_state.detect(st, "exp_avg", pos.numel(),
                                                                                     "t"),
                                              torch.empty(pos.numel(), device="meta"), True)
        regrown = ~torch.isin(pos, old_pos)
        assert regrown.any() and (exp_avg[regrown] == 0).all()
        assert (p[~m1] == 0).all()
        old = {k: st[k].clone() for k in old}


def test_state_bytes_per_param_at_90_percent_mask():
    torch.manual_seed(0)
    ps = masked_params(0.1, [(256, 300), (4096,)])
    opt = nno.AdamW(ps, state_bits=8, min_quant_size=0, compact_states=True)
    set_grads(ps)
    opt.step()
    per_param = state_bytes(opt) / sum(p.numel() for p in ps)
    assert per_param <= 0.3, per_param


def test_state_dict_round_trip_and_conversion():
    ps = masked_params()
    opt = nno.AdamW(ps, lr=1e-2, state_bits=8, min_quant_size=0, compact_states=True)
    set_grads(ps)
    opt.step()
    sd = opt.state_dict()
    qs = twin(ps)
    again = nno.AdamW(qs, lr=1e-2, state_bits=8, min_quant_size=0, compact_states=True)
    again.load_state_dict(sd)
    set_grads(ps, qs)
    opt.step()
    again.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, again.state[q][k]), k
    # Into full states: expanded (and converted to 32 bits), zeros at the pruned entries.
    full_ps = twin(ps)
    full = nno.AdamW(full_ps, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full.load_state_dict(opt.state_dict())
    for p, q in zip(ps, full_ps):
        st = full.state[q]
        assert "kept_index" not in st and st["exp_avg"].shape == q.shape
        assert (st["exp_avg"][~sparsity.get_mask(q)] == 0).all()
        assert torch.allclose(st["exp_avg"][sparsity.get_mask(q)],
                              nno._quant_state.read_float(opt.state[p], "exp_avg", ("q", 8, 256),
                                                          torch.empty(int(sparsity.get_mask(p).sum()),
                                                                      device="meta"), True))
    set_grads(full_ps)
    full.step()
    # dequantized_state_dict: full fp32 states, loadable by torch.optim.
    dq = nno.dequantized_state_dict(opt)
    tp = twin(ps)
    torch_opt = torch.optim.AdamW(tp, lr=1e-2)
    torch_opt.load_state_dict(dq)
    for j, p in enumerate(ps):
        st, m = dq["state"][j], sparsity.get_mask(p)
        assert "kept_index" not in st and st["exp_avg"].shape == p.shape and (st["exp_avg"][~m] == 0).all()
        packed = nno._quant_state.read_float(opt.state[p], "exp_avg", ("q", 8, 256),
                                             torch.empty(int(m.sum()), device="meta"), True)
        assert torch.equal(st["exp_avg"][m], packed)
    # Into another mask: remapped at the next step.
    rs = twin(ps)
    for r in rs:
        sparsity.set_mask(r, torch.rand(r.shape) < 0.3)
    other = nno.AdamW(rs, lr=1e-2, state_bits=8, min_quant_size=0, compact_states=True)
    other.load_state_dict(sd)
    set_grads(rs)
    other.step()
    for r in rs:
        assert torch.equal(decode_index(other.state[r]["kept_index"]),
                           sparsity.get_mask(r).reshape(-1).nonzero().reshape(-1))


def test_bf16_master_weights():
    ps = [torch.nn.Parameter(torch.randn(40, 50, dtype=torch.bfloat16))]
    sparsity.set_mask(ps[0], torch.rand(40, 50) < 0.4)
    qs = twin(ps)
    full = nno.AdamW(ps, lr=1e-2, master_weights=True)
    compact = nno.AdamW(qs, lr=1e-2, master_weights=True, compact_states=True)
    for _ in range(3):
        set_grads(ps, qs)
        full.step()
        compact.step()
    assert torch.equal(ps[0], qs[0])
    assert compact.state[qs[0]]["master_param"].numel() == int(sparsity.get_mask(qs[0]).sum())


def test_without_mask_warns_and_has_no_effect():
    p = torch.nn.Parameter(torch.randn(30, 40))
    q = torch.nn.Parameter(p.detach().clone())
    with pytest.warns(UserWarning, match="compact_states=True but no parameter"):
        opt = nno.AdamW([q], lr=1e-2, compact_states=True)
    ref = nno.AdamW([p], lr=1e-2)
    set_grads([p], [q])
    ref.step()
    opt.step()
    assert torch.equal(p, q) and "kept_index" not in opt.state[q]


def test_mask_removed_expands_states():
    ps = masked_params()
    opt = nno.Adam(ps, lr=1e-2, compact_states=True)
    set_grads(ps)
    opt.step()
    sparsity.clear_mask(ps[0])
    set_grads(ps)
    opt.step()
    assert "kept_index" not in opt.state[ps[0]] and opt.state[ps[0]]["exp_avg"].shape == ps[0].shape


def test_bad_input():
    ps = masked_params()
    with pytest.raises(ValueError, match="compact_states must be a bool"):
        nno.AdamW(ps, compact_states=1)
    with pytest.raises(ValueError, match="compact_states of param group 0 must be a bool"):
        nno.AdamW([{"params": ps, "compact_states": "yes"}])
    opt = nno.AdamW(ps, lr=1e-2, compact_states=True)
    before = [p.detach().clone() for p in ps]
    ps[0].grad = torch.randn_like(ps[0])
    ps[1].grad = torch.randn_like(ps[1]).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state
    set_grads(ps)
    opt.step()
    sd = opt.state_dict()
    bad = dict(sd, state={k: dict(v) for k, v in sd["state"].items()})
    bad["state"][0]["kept_index"] = torch.full((10000,), 0xEE, dtype=torch.uint8)  # beyond the parameter
    fresh = nno.AdamW(twin(ps), lr=1e-2, compact_states=True)
    with pytest.raises(ValueError, match="kept_index addresses entries beyond"):
        fresh.load_state_dict(bad)
    assert not fresh.state


@pytest.mark.parametrize("bits", [32, 8])
def test_grad_scaler_inputs(bits):
    """found_inf skips the step (parameters, states and counts unchanged); grad_scale divides the gradients."""
    ps = masked_params()
    qs = twin(ps)
    full = nno.AdamW(ps, lr=1e-2, state_bits=bits, min_quant_size=0)
    compact = nno.AdamW(qs, lr=1e-2, state_bits=bits, min_quant_size=0, compact_states=True)
    set_grads(ps, qs)
    full.step()
    compact.step()
    before = [q.detach().clone() for q in qs]
    steps = [float(compact.state[q]["step"]) for q in qs]
    set_grads(qs)
    compact.grad_scale, compact.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    compact.step()
    assert all(torch.equal(q, b) for q, b in zip(qs, before))
    assert [float(compact.state[q]["step"]) for q in qs] == steps
    set_grads(ps, qs)
    for q in qs:
        q.grad.mul_(8.0)
    compact.found_inf = torch.tensor(0.0)
    full.step()
    compact.step()
    if bits == 32:
        assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert all((q[~sparsity.get_mask(q)] == 0).all() for q in qs)
    assert [float(compact.state[q]["step"]) for q in qs] == [s + 1 for s in steps]


def test_transformers_gpt2_masked_linears():
    """A GPT-2 from a transformers config with 80%-masked linear layers (Conv1D): compact fp32 AdamW gives the same
    model as full states over a few steps; 8-bit compact states keep pruned weights at exactly 0."""
    transformers = pytest.importorskip("transformers")
    from nnopt import layers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    models = [transformers.GPT2LMHeadModel(cfg) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    masks = {name: torch.rand(mod.weight.shape) < 0.2 for name, mod in layers.linear_modules(models[0])}
    for m in models:
        for name, mod in layers.linear_modules(m):
            sparsity.set_mask(mod.weight, masks[name].clone())
    opts = [nno.AdamW(models[0].parameters(), lr=3e-3),
            nno.AdamW(models[1].parameters(), lr=3e-3, compact_states=True),
            nno.AdamW(models[2].parameters(), lr=3e-3, compact_states=True, state_bits=8, min_quant_size=0)]
    ids = torch.randint(0, 64, (4, 32))
    for _ in range(3):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
    for (_, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b)
    for name, mod in layers.linear_modules(models[2]):
        assert (mod.weight[~masks[name]] == 0).all()
        assert "kept_index" in opts[2].state[mod.weight]
