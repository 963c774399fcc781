"""Optimizers with low-precision states (state_bits=16/8/4, stochastic_rounding): accuracy against fp32 within the
documented one-step bound, masks, checkpoints (round trips, torch.optim in and out, format changes), GradScaler,
masters, aliases, a transformers model, and bad input.
"""

import copy
import math
import warnings

import pytest
import torch

import nnopt.optim as nno
from nnopt import sparsity
from nnopt.reference import quant_optim as R
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(70, 71), (4096,), (33, 130), (10,)]  # the last stays fp32 (below min_quant_size)
OPTS = [("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2)), ("Adam", dict(lr=1e-2, weight_decay=0.1)),
        ("AdamW", dict(lr=1e-2, amsgrad=True)), ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.1)),
        ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True))]


def params(dtype=torch.float32, sizes=SIZES):
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in sizes]


def twin(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def grads(*lists):
    for ps in zip(*lists):
        g = torch.randn_like(ps[0])
        for p in ps:
            p.grad = g.clone()


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def dequantized(opt, p, name, signed):
    st = opt.state[p]
    fmt = nno._quant_state.detect(st, name, p.numel(), "test")
    return nno._quant_state.read_float(st, name, fmt, p, signed).view(p.shape)


@pytest.mark.parametrize("bits,bar", [(16, 4.05), (8, 2.05), (4, 1.05)])
def test_state_bytes_per_param(bits, bar):
    ps = params(sizes=[(256, 300), (4096,)])
    opt = nno.AdamW(ps, state_bits=bits)
    grads(ps)
    opt.step()
    assert state_bytes(opt) / sum(p.numel() for p in ps) <= bar


def adam_one_step_bound(p0, g, m, v, m_q, v_q, am, av, lr, betas, eps, step, bits, block):
    """Elementwise bound on |p_quant - p_fp32| after one AdamW step from states m, v (fp32) and their quantized
    versions m_q, v_q (docs/quantized_states.md): with E = absmax_block * G / 2 the storage error of a state (G the
    map's largest gap), m' and v' the fp32 step's new moments and d = sqrt(v')/bc2 + eps,
        |dp| <= lr/bc1 * (b1*E_m / d~ + |m'| * sqrt(b2*E_v) / (bc2 * d * d~)),
    d~ from the quantized side. Returned with float32 rounding slack."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1**step, math.sqrt(1 - b2**step)
    gaps = [(R.state_map(s, bits).diff().max().item()) for s in (True, False)]
    em = am.double().repeat_interleave(block)[: p0.numel()].view(p0.shape) * gaps[0] / 2
    ev = av.double().repeat_interleave(block)[: p0.numel()].view(p0.shape) * gaps[1] / 2
    g, m, v, m_q, v_q = (t.double() for t in (g, m, v, m_q, v_q))
    m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    v1q = b2 * v_q + (1 - b2) * g * g
    d, dq = v1.sqrt() / bc2 + eps, v1q.sqrt() / bc2 + eps
    bound = lr / bc1 * (b1 * em / dq + m1.abs() * (b2 * ev).sqrt() / (bc2 * d * dq))
    return bound + 1e-6 * (1 + p0.double().abs())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_checkpoint_then_one_step_within_bound(bits, backend):
    """torch.optim.AdamW trains 3 steps; its fp32 state loads into an nnopt AdamW with quantized states (converted,
    with a warning); one more step on each: parameters differ by at most the one-step bound."""
    skip_unless_available(backend, "cpu", "quant_optim")
    ps = params(sizes=[(70, 71), (4096,)])
    qs = twin(ps)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW(ps, foreach=False, **kw)
    for _ in range(3):
        grads(ps)
        ref.step()
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    ours = nno.AdamW(qs, state_bits=bits, backend=backend, **kw)
    with pytest.warns(UserWarning, match=f"from 32-bit to {bits}-bit"):
        ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    before = [(ref.state[p]["exp_avg"].clone(), ref.state[p]["exp_avg_sq"].clone()) for p in ps]
    quant = [(dequantized(ours, q, "exp_avg", True), dequantized(ours, q, "exp_avg_sq", False),
              ours.state[q]["exp_avg_absmax"], ours.state[q]["exp_avg_sq_absmax"]) for q in qs]
    p0 = [p.detach().clone() for p in ps]
    grads(ps, qs)
    ref.step()
    ours.step()
    for p, q, p_0, (m, v), (mq, vq, am, av) in zip(ps, qs, p0, before, quant):
        bound = adam_one_step_bound(p_0, p.grad, m, v, mq, vq, am, av, kw["lr"], kw["betas"], 1e-8, 4, bits,
                                    R.DEFAULT_BLOCK[bits])
        err = (q.detach().double() - p.detach().double()).abs()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
        assert err.max() > 0  # the states really were quantized


@pytest.mark.parametrize("name,kwargs", OPTS)
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_close_to_fp32_and_masks_exact(name, kwargs, bits):
    """10 steps with a mask on every parameter: pruned entries of parameters and (dequantized) states exactly 0,
    the rest close to the fp32 optimizer (a loose check; the bound test above is the precise one)."""
    ps = params()
    masks = [torch.rand(p.shape) > 0.5 for p in ps]
    for p, m in zip(ps, masks):
        sparsity.set_mask(p, m)
    qs = twin(ps)
    for q, m in zip(qs, masks):
        sparsity.set_mask(q, m)
    ours = getattr(nno, name)(ps, state_bits=bits, l1=1e-4, **kwargs)
    ref = getattr(nno, name)(qs, l1=1e-4, **kwargs)
    for _ in range(10):
        grads(ps, qs)
        ours.step()
        ref.step()
    tol = {16: 0.02, 8: 0.05, 4: 0.3}[bits]
    for p, q, m in zip(ps, qs, masks):
        assert (p.detach()[~m] == 0).all()
        for (name_, signed) in ours._slots(ours.param_groups[0]):
            assert (dequantized(ours, p, name_, signed)[~m] == 0).all()
        drift = (p.detach() - q.detach()).abs().max() / q.detach().abs().max()
        assert drift < tol


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_state_dict_round_trip_exact(bits):
    ps = params()
    opt = nno.RMSprop(ps, lr=1e-2, momentum=0.9, state_bits=bits)
    for _ in range(3):
        grads(ps)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["state_bits"] == bits
    qs = twin(ps)
    other = nno.RMSprop(qs, lr=1e-2, momentum=0.9, state_bits=bits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same format: no conversion
        other.load_state_dict(sd)
    for _ in range(3):
        grads(ps, qs)
        opt.step()
        other.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, other.state[q][k]), k


def test_dequantized_state_dict_loads_into_torch():
    ps = params()
    opt = nno.AdamW8bit(ps, lr=1e-2)
    for _ in range(3):
        grads(ps)
        opt.step()
    sd = nno.dequantized_state_dict(opt)
    qs = twin(ps)
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    ref.load_state_dict(sd)
    for p, q in zip(ps, qs):
        assert torch.equal(ref.state[q]["exp_avg"], dequantized(opt, p, "exp_avg", True))
        assert set(ref.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
    grads(ps, qs)
    opt.step()
    ref.step()
    for p, q in zip(ps, qs):
        assert_close(p.detach(), q.detach(), torch.bfloat16)


def test_changing_state_bits_converts():
    ps = params()
    opt = nno.Adam(ps, state_bits=8)
    grads(ps)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for bits, dtype in ((4, torch.uint8), (16, torch.bfloat16), (32, torch.float32)):
        qs = twin(ps)
        other = nno.Adam(qs, state_bits=bits)
        with pytest.warns(UserWarning, match="from 8-bit"):
            other.load_state_dict(sd)
        big = qs[0]
        assert other.state[big]["exp_avg"].dtype == dtype
        assert ("exp_avg_absmax" in other.state[big]) == (bits == 4)
        got, want = dequantized(other, big, "exp_avg", True), dequantized(opt, ps[0], "exp_avg", True)
        if bits == 4:  # within the 4-bit storage error (half the signed map's largest gap, times the absmax)
            assert (got - want).abs().max() <= 0.1125 * want.abs().max() * 1.0001
        else:
            assert_close(got, want, torch.bfloat16)
        grads(qs)
        other.step()
    # A group's state_bits changed during training: the next step converts its states.
    opt.param_groups[0]["state_bits"] = 16
    grads(ps)
    with pytest.warns(UserWarning, match="to 16-bit"):
        opt.step()
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16


def test_bad_input():
    ps = params()
    for kw, what in ((dict(state_bits=6), "state_bits"), (dict(state_bits=True), "state_bits"),
                     (dict(state_bits=8, block_size=48), "block_size"),
                     (dict(state_bits=8, block_size=16), "block_size"),
                     (dict(min_quant_size=-1), "min_quant_size"), (dict(stochastic_rounding=1), "stochastic_rounding")):
        with pytest.raises(ValueError, match=what):
            nno.AdamW(ps, **kw)
    opt = nno.AdamW(ps[:2], state_bits=8)
    with pytest.raises(ValueError, match="state_bits of param group 1"):
        opt.add_param_group({"params": ps[2:], "state_bits": 3})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="state_bits=8"):
        nno.AdamW8bit(ps, state_bits=4)
    grads(ps[:2])
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].reshape(-1)[:100]  # corrupted codes
    before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    with pytest.raises(ValueError, match="fit no 8-bit layout"):
        opt.load_state_dict(sd)
    for k, v in before.items():
        assert torch.equal(opt.state[ps[0]][k], v)


def test_grad_scaler_inputs_and_masters():
    """found_inf skips everything; grad_scale divides; bf16 parameters with fp32 masters and 8-bit states."""
    ps = params(torch.bfloat16, sizes=[(64, 80)])
    opt = nno.AdamW(ps, lr=1e-2, state_bits=8, master_weights=True)
    qs = twin(ps)
    ref = nno.AdamW(qs, lr=1e-2, state_bits=8, master_weights=True)
    grads(ps, qs)
    opt.step()
    ref.step()
    before = (ps[0].detach().clone(), {k: v.clone() for k, v in opt.state[ps[0]].items()})
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    grads(ps)
    opt.step()
    assert torch.equal(ps[0], before[0])
    assert all(torch.equal(opt.state[ps[0]][k], v) for k, v in before[1].items() if k != "step")
    opt.found_inf = torch.tensor(0.0)
    g = torch.randn_like(ps[0])
    ps[0].grad, qs[0].grad = g * 8, g.clone()
    opt.step()
    ref.step()
    assert torch.equal(opt.state[ps[0]]["master_param"], ref.state[qs[0]]["master_param"])
    assert torch.equal(ps[0], opt.state[ps[0]]["master_param"].to(torch.bfloat16))


def test_stochastic_rounding_reproducible_and_checkpointed():
    def run(seed, sr=True, steps=4):
        torch.manual_seed(seed)
        ps = params(torch.bfloat16, sizes=[(64, 80), (10,)])
        opt = nno.AdamW(ps, lr=1e-3, state_bits=8, stochastic_rounding=sr)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return ps, opt

    a, b, c = run(0)[0], run(0)[0], run(0, sr=False)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # Small updates (lr * ~1 << a bf16 ulp of most weights) survive in expectation only with stochastic rounding.
    ps, opt = run(0, steps=2)
    sd = copy.deepcopy(opt.state_dict())
    qs = twin(ps)
    other = nno.AdamW(qs, lr=1e-3, state_bits=8, stochastic_rounding=True)
    other.load_state_dict(sd)
    for _ in range(2):
        grads(ps, qs)
        opt.step()
        other.step()
    assert all(torch.equal(x, y) for x, y in zip(ps, qs))


def test_aliases():
    ps = params()
    assert nno.Adam8bit(ps).param_groups[0]["state_bits"] == 8
    assert nno.AdamW8bit(ps).param_groups[0]["decoupled_weight_decay"]
    opt = nno.AdamW4bit(ps, lr=1e-3, betas=(0.9, 0.95), block_size=64)
    assert (opt.param_groups[0]["state_bits"], opt.param_groups[0]["block_size"]) == (4, 64)


def test_sgd_first_step_with_dampening():
    """A fresh momentum buffer starts as the gradient (torch's rule), also when it is quantized."""
    ps = params(sizes=[(4096,)])
    qs = twin(ps)
    ours = nno.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5, state_bits=16)
    ref = torch.optim.SGD(qs, lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
    for _ in range(3):
        grads(ps, qs)
        ours.step()
        ref.step()
        assert_close(ours.state[ps[0]]["momentum_buffer"].float(), ref.state[qs[0]]["momentum_buffer"],
                     torch.bfloat16)


def test_transformers_gpt2_and_scheduler():
    """A GPT-2 from a transformers config (random init) trained a few steps with AdamW8bit and a scheduler tracks
    fp32 AdamW closely."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    a = transformers.GPT2LMHeadModel(cfg)
    b = copy.deepcopy(a)
    oa, ob = nno.AdamW8bit(a.parameters(), lr=3e-3), nno.AdamW(b.parameters(), lr=3e-3)
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (oa, ob))
    ids = torch.randint(0, 64, (4, 32))
    for _ in range(6):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            s.step()
    la, lb = (float(m(input_ids=ids, labels=ids).loss.detach()) for m in (a, b))
    assert abs(la - lb) < 0.02 * lb
    assert any(st["exp_avg"].dtype == torch.uint8 for st in oa.state.values())


def test_torch_compile_around_the_training_step():
    """torch.compile (aot_eager) around forward, backward and an 8-bit AdamW step gives eager's results exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    twin_model = copy.deepcopy(model)
    opts = [nno.AdamW8bit(m.parameters(), lr=1e-2, min_quant_size=0) for m in (model, twin_model)]
    x = torch.randn(32, 64)

    def step(m, opt):
        loss = m(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    compiled = torch.compile(step, backend="aot_eager")
    for _ in range(3):
        assert torch.equal(compiled(model, opts[0]), step(twin_model, opts[1]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
