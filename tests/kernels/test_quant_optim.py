"""quant_optim kernels against nnopt.reference.quant_optim: every backend, op, state width, dtype, mask and size.

Codes and scales must be identical to the reference's (the quantizer is deterministic and the kernels compute the
same correctly rounded quotient); parameters match to the fused kernels' tolerance (bit-exact on CPU except where
torch's sqrt rounds differently). Also: the quantizer's own guarantees, stochastic rounding, opcheck, bad input.
"""

import math

import pytest
import torch

from nnopt import backends
from nnopt.reference import quant_optim as R
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = "quant_optim"
BACKENDS = ["triton", "cpu", "torch"]
SIZES = [1, 17, 64, 300, 1000 + 17]  # below, at and across block boundaries (blocks of 32 and 128/256)
OPS = {
    "adam_step": dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=True,
                      maximize=False, l1=0.0, bias_correction1=1 - 0.9**3,
                      bias_correction2_sqrt=math.sqrt(1 - 0.99**3)),
    "sgd_step": dict(lr=1e-2, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False,
                     l1=1e-3, first_step=False),
    "adagrad_step": dict(lr=1e-2, weight_decay=0.0, eps=1e-10, maximize=True, l1=0.0, lr_decay_denom=1.0),
    "rmsprop_step": dict(lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.5, centered=True,
                         maximize=False, l1=0.0),
}


def impl(backend):
    return backends.implementation(FAMILY, backend)


def make_states(op, n, bits, block, device="cpu"):
    """Random states of every slot the op uses (one list per slot, one tensor each), already in the format.
    Centered RMSprop needs grad_avg^2 <= square_avg (else its sqrt is NaN): its states are drawn so."""
    states, scales = [], []
    bounded = op == "rmsprop_step"
    for signed in R.SIGNED[op]:
        if bounded:
            x = torch.rand(n, device=device) - 0.5 if signed else torch.rand(n, device=device) + 0.5
        else:
            x = torch.randn(n, device=device) if signed else torch.rand(n, device=device) ** 3
        if bits in (8, 4):
            c, a = R.quantize(x, bits, block, signed)
            states.append([c]), scales.append([a])
        else:
            states.append([x.to(torch.bfloat16 if bits == 16 else torch.float32)]), scales.append([])
    return states, scales


def clone(lists):
    return [[t.clone() for t in lst] for lst in lists]


def run_both(backend, op, n, bits, dtype, masked, master, seed=-1, device="cpu", **extra):
    block = 32 if n < 300 else R.DEFAULT_BLOCK.get(bits, 256)
    p = torch.randn(n, dtype=dtype, device=device)
    g = torch.randn(n, dtype=dtype, device=device)
    masters = [p.float()] if master else []
    masks = [torch.rand(n, device=device) > 0.3] if masked else []
    if masked:
        p = p.masked_fill(~masks[0], 0)
    states, scales = make_states(op, n, bits, block, device)
    got = (p.clone(), clone(states), clone(scales), [m.clone() for m in masters])
    hyper = dict(OPS[op], **extra)
    R.quant_step(op, [p], [g], states, scales, masters, masks, bits=bits, block_size=block, seed=seed, **hyper)
    impl(backend).quant_step(op, [got[0]], [g], got[1], got[2], got[3], masks, bits=bits, block_size=block,
                             seed=seed, **hyper)
    return (p, states, scales, masters, masks), got


def check_same(ref, got, exact_params):
    (p, states, scales, masters, masks), (p2, states2, scales2, masters2) = ref, got
    for lst, lst2 in zip(states + scales, states2 + scales2):
        for a, b in zip(lst, lst2):
            if a.dtype == torch.uint8:
                assert torch.equal(a, b), f"codes differ at {(a != b).nonzero()[:5].tolist()}"
            elif exact_params:
                assert torch.equal(a, b)
            else:
                assert_close(b, a, torch.float32 if a.dtype == torch.float32 else torch.bfloat16)
    if exact_params:
        assert torch.equal(p, p2)
    else:
        assert_close(p2, p)
    for m, m2 in zip(masters, masters2):
        assert_close(m2, m)
    if masks:
        assert (p2[~masks[0]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bits", [8, 4, 16, 32])
def test_matches_reference(backend, op, bits):
    skip_unless_available(backend, "cpu", FAMILY)
    combos = ((torch.float32, False, False), (torch.bfloat16, True, False), (torch.float16, False, True),
              (torch.float32, True, False))
    if backend == "triton":  # the interpreter is slow: fewer combinations, every feature still covered
        combos = combos[1:3]
    for n in SIZES if backend != "triton" else SIZES[1:4]:
        for dtype, masked, master in combos:
            ref, got = run_both(backend, op, n, bits, dtype, masked, master)
            # codes always agree; parameters bit for bit where no sqrt is involved (SGD): torch's sqrt may differ
            # from ours by 1 ulp.
            check_same(ref, got, exact_params=(op == "sgd_step" and backend == "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bits", [8, 4, 16, 32])
def test_matches_reference_gpu(backend, op, bits):
    """On CUDA tensors: codes identical to the reference's (computed on the same device), parameters within
    tolerance, masked entries 0; stochastic rounding bit-identical (its stream is integer arithmetic)."""
    skip_unless_available(backend, "cuda", FAMILY)
    for n in SIZES + [278011]:
        for dtype, masked, master in ((torch.float32, False, False), (torch.bfloat16, True, False),
                                      (torch.float16, False, True)):
            ref, got = run_both(backend, op, n, bits, dtype, masked, master, device="cuda")
            check_same(ref, got, exact_params=False)
    ref, got = run_both(backend, "adam_step", 4096, 8, torch.bfloat16, False, False, seed=99, device="cuda")
    assert torch.equal(ref[0], got[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_found_inf_lr_tensor_step(backend):
    skip_unless_available(backend, "cpu", FAMILY)
    extra = dict(grad_scale=torch.tensor(4.0), lr_tensor=torch.tensor([3e-3]), step=torch.tensor(5.0))
    ref, got = run_both(backend, "adam_step", 1000, 8, torch.float32, False, False, **extra)
    check_same(ref, got, exact_params=False)
    p, states, scales = torch.randn(300), *make_states("adam_step", 300, 8, 256)
    before = (p.clone(), clone(states), clone(scales))
    impl(backend).quant_step("adam_step", [p], [torch.randn(300)], states, scales, [], [], bits=8, block_size=256,
                             found_inf=torch.tensor(1.0), **OPS["adam_step"])
    assert torch.equal(p, before[0])
    assert all(torch.equal(a, b) for la, lb in zip(states + scales, before[1] + before[2]) for a, b in zip(la, lb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("eps", [0.0, 1e-39])
def test_adam_quotient_edges(backend, bits, eps):
    """Adam with quantized states (the CPU computes its last quotient with a refined reciprocal estimate): within
    float32 tolerance of the reference with l1, maximize and a grad scale (the non-plain loop), and the reference's
    huge or inf updates where its denominator is 0 or subnormal (eps 0 or subnormal, zero gradient and exp_avg_sq,
    exp_avg not zero: the lanes that must take the exact division, since the estimate overflows there)."""
    skip_unless_available(backend, "cpu", FAMILY)
    n, block = 1000 + 5, R.DEFAULT_BLOCK.get(bits, 256)
    hyper = dict(OPS["adam_step"], eps=eps, l1=1e-3, maximize=True, amsgrad=False, grad_scale=torch.tensor(2.0))
    p, g = torch.randn(n), torch.randn(n)
    g[::7] = 0
    states, scales = make_states("adam_step", n, bits, block)
    states[2], scales[2] = [], []
    v = states[1][0].float() if bits == 16 else R.dequantize(states[1][0], scales[1][0], n, bits, block, False)
    v[::7] = 0
    if bits == 16:
        states[1] = [v.to(torch.bfloat16)]
    else:
        states[1][0], scales[1][0] = R.quantize(v, bits, block, False)
    got = (p.clone(), clone(states), clone(scales))
    R.quant_step("adam_step", [p], [g], states, scales, [], [], bits=bits, block_size=block, **hyper)
    impl(backend).quant_step("adam_step", [got[0]], [g], got[1], got[2], [], [], bits=bits, block_size=block,
                             **hyper)
    m = states[0][0] if bits == 16 else R.dequantize(states[0][0], scales[0][0], n, bits, block, True)
    assert (p[::7][m[::7] != 0].abs() > 1e30).all() and p[1::7].isfinite().all()
    torch.testing.assert_close(got[0], p, rtol=1e-6, atol=1e-6, equal_nan=True)
    for a, b in zip(states + scales, got[1] + got[2]):
        if a and a[0].dtype == torch.uint8:
            assert torch.equal(a[0], b[0])


def _edge_values(bits, signed, block):
    """Values that land exactly on every midpoint and map value and one ulp either side of them, zeros, tiny values,
    in blocks that each start with 1.0 (so absmax is 1 and the normalized value is the value itself), then one block
    holding an inf and one holding a NaN."""
    qmap, mids = R.tables(bits, "cpu")
    row = 0 if signed else 1
    pts = torch.cat([mids[row, :-1], qmap[row]])
    pts = torch.cat([pts, torch.nextafter(pts, torch.tensor(2.0)), torch.nextafter(pts, torch.tensor(-2.0)),
                     torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, 1e-9, 3e-8])]).clamp(-1, 1)
    # Powers of two (their low mantissa bits are all zero) around the CPU quantizer's first bucket, |x| < 2^-24,
    # normal and subnormal, and either side of its edge.
    p2 = torch.tensor([2.0**-24, 2.0**-30, 2.0**-40, 2.0**-126, 2.0**-130, 2.0**-149])
    p2 = torch.cat([p2, torch.nextafter(p2[:1], torch.zeros(1))])
    pts = torch.cat([pts, p2, -p2])
    if not signed:
        pts = pts.abs()
    per = block - 1
    chunks = [torch.cat([torch.ones(1), pts[i:i + per]]) for i in range(0, pts.numel(), per)]
    special = torch.full((2 * block,), 0.5)
    special[3], special[block + 5] = float("inf"), float("nan")
    return torch.cat(chunks[:-1] + [special, chunks[-1]])  # the last block is partial: the kernels' tails


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_codes_at_edges(backend, bits):
    """Codes identical to the reference's on ties (values exactly on a midpoint go to the lower code), one ulp off
    them, tiny positives of unsigned states (never code 0), zeros, and blocks with an inf or a NaN.

    Signed states through SGD's first step (the momentum buffer becomes the gradient exactly); unsigned ones through
    Adam with beta2 = 0 (exp_avg_sq becomes g*g for g = sqrt(value): within an ulp of each edge, both sides)."""
    skip_unless_available(backend, "cpu", FAMILY)
    block = R.DEFAULT_BLOCK[bits]
    cases = [("sgd_step", _edge_values(bits, True, block), dict(OPS["sgd_step"], first_step=True, weight_decay=0.0,
                                                                  l1=0.0, dampening=0.0))]
    cases.append(("adam_step", _edge_values(bits, False, block).sqrt(), dict(OPS["adam_step"], beta2=0.0,
                                                                           amsgrad=False)))
    for op, g, hyper in cases:
        n = g.numel()
        p = torch.randn(n)
        states, scales = make_states(op, n, bits, block)
        if op == "adam_step":  # no amsgrad: the third slot is unused
            states[2], scales[2] = [], []
        got = (p.clone(), clone(states), clone(scales))
        R.quant_step(op, [p], [g], states, scales, [], [], bits=bits, block_size=block, **hyper)
        impl(backend).quant_step(op, [got[0]], [g], got[1], got[2], [], [], bits=bits, block_size=block, **hyper)
        for k, (a, b) in enumerate(zip(states + scales, got[1] + got[2])):
            if not a:
                continue
            if a[0].dtype == torch.uint8:
                bad = (a[0] != b[0]).nonzero()[:5].tolist()
                assert torch.equal(a[0], b[0]), f"{op} slot {k}: codes differ at {bad}"
            else:  # absmax: exact (a NaN block's NaN payload may differ)
                torch.testing.assert_close(b[0], a[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding(backend):
    """bf16 parameters rounded stochastically: identical to the reference's stream, reproducible, unbiased."""
    skip_unless_available(backend, "cpu", FAMILY)
    ref, got = run_both(backend, "adam_step", 1000, 8, torch.bfloat16, False, False, seed=1234)
    assert torch.equal(ref[0], got[0])
    x = torch.full((20000,), 1.0 + 2**-9)  # a quarter of the way between two bf16 values
    sr = R.stochastic_round_bf16(x, R.sr_key(7, 0)).float()
    assert set(sr.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(sr.mean().item() - x[0].item()) < 4e-4
    assert torch.equal(sr, R.stochastic_round_bf16(x, R.sr_key(7, 0)).float())
    assert not torch.equal(sr, R.stochastic_round_bf16(x, R.sr_key(8, 0)).float())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_quantizer(bits, signed):
    """Nearest code (within half the local gap), zeros exact, positives never zero (unsigned), round trip."""
    qmap = R.state_map(signed, bits)
    assert qmap.numel() == 2**bits and (qmap[1:] > qmap[:-1]).all() and 0.0 in qmap.tolist() and qmap.max() == 1
    n, block = 3001, R.DEFAULT_BLOCK[bits]
    x = torch.randn(n) if signed else torch.rand(n) ** 4
    x[::7] = 0
    codes, absmax = R.quantize(x, bits, block, signed)
    y = R.dequantize(codes, absmax, n, bits, block, signed)
    assert (y[::7] == 0).all()
    if not signed:
        assert (y[x > 0] > 0).all()
    a = absmax.float().repeat_interleave(block)[:n]
    xn = x / a
    dist = (xn[:, None] - qmap[None, :]).abs()
    best = dist.min(1).values
    mine = (y / a - xn).abs()
    tiny = (xn > 0) & (xn < qmap[qmap > 0].min() / 2)  # the unsigned never-zero rule, by design
    assert (mine[~tiny] <= best[~tiny] + 1e-7).all()
    # Requantizing dequantized values keeps the codes when the block's absmax is itself a code value (the max).
    c2, _ = R.quantize(y, bits, block, signed)
    if signed:
        assert (c2 == codes).float().mean() > 0.99
    else:
        assert torch.equal(c2, codes)


def test_opcheck():
    skip_unless_available("cpu", "cpu", FAMILY)
    qmap, mids = R.tables(8, "cpu")
    n = 300
    states, scales = make_states("adam_step", n, 8, 256)
    args = ("adam_step", [torch.randn(n)], [torch.randn(n)], states[0], states[1], [], scales[0], scales[1], [],
            [], [], qmap, mids)
    kwargs = dict(bits=8, block_size=256, hyper=[1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.1, 0.03], flags=[1, 0, 0],
                  seed=-1)
    torch.library.opcheck(torch.ops.nnopt.quant_step_, args, kwargs)


@pytest.mark.parametrize("backend", ["cpu"])
def test_bad_input(backend):
    skip_unless_available(backend, "cpu", FAMILY)
    f = impl(backend).quant_step
    n = 300
    p, g = torch.randn(n), torch.randn(n)
    states, scales = make_states("adam_step", n, 8, 256)
    before = p.clone()
    with pytest.raises(RuntimeError, match="states1"):
        f("adam_step", [p], [g], [states[0], [states[1][0][:10]], []], scales, [], [], bits=8, block_size=256,
          **dict(OPS["adam_step"], amsgrad=False))
    with pytest.raises(RuntimeError, match="scales0"):
        f("adam_step", [p], [g], states, [[scales[0][0].double()], scales[1], []], [], [], bits=8, block_size=256,
          **dict(OPS["adam_step"], amsgrad=False))
    with pytest.raises(RuntimeError, match="block_size"):
        f("adam_step", [p], [g], states, scales, [], [], bits=8, block_size=48, **OPS["adam_step"])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        f("adam_step", [p.double()], [g.double()], states, scales, [], [], bits=8, block_size=256,
          **dict(OPS["adam_step"], amsgrad=False))
    assert torch.equal(p, before)
