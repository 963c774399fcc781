"""The distill_loss family at the function level: every backend's (loss, d loss / d student) against the reference.

``distill_loss_fwd`` of each backend (torch = nnopt.reference.distill_loss, cpu = the registered C++ op, triton =
nnopt.kernels.distill_loss, under the interpreter on CPU with chunks of 64 classes so a row spans many chunks) on
fresh random logits (scaled so distributions range from flat to peaked) for every kind, T in {0.5, 1, 4}, alpha in
{0, 0.5, 1}, rows B in {1, 7} and classes V in {33, 1000} (not multiples of any block), with no, some and all rows
ignored and targets absent where alpha = 1 allows. The expected values are the reference computed in float64 on the
same inputs, compared with nnopt.testing's tolerance for the inputs' dtype and a reduction of length V. The `gpu`
test runs the compiled Triton kernel on CUDA.
"""

import itertools

import pytest
import torch

from nnopt import backends
from nnopt.reference import distill_loss as ref
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

FAMILY = "distill_loss"
BACKENDS = ["torch", "cpu", "triton"]
KINDS = ["kl", "reverse_kl", "jsd"]
TEMPERATURES = [0.5, 1.0, 4.0]
ALPHAS = [0.0, 0.5, 1.0]
SHAPES = [(7, 1000), (1, 33), (7, 33), (1, 1000)]
IGNORE = ["some", "none", "all", "no-target"]
# every kind × temperature × alpha; shape and ignored rows cycle along the list
CASES = [(kind, temp, alpha, SHAPES[i % len(SHAPES)], IGNORE[i % len(IGNORE)])
         for i, (kind, temp, alpha) in enumerate(itertools.product(KINDS, TEMPERATURES, ALPHAS))]
CASE_IDS = [f"{k}-T{t}-a{a}-{b}x{v}-{ig}" for k, t, a, (b, v), ig in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # many chunks per row on the interpreter (the GPU uses up to 4096 classes per chunk)
    if backends.triton_missing() is None and not torch.cuda.is_available():
        from nnopt.kernels import distill_loss as tk

        monkeypatch.setattr(tk, "MAX_BLOCK_V", 64)


def impl(backend, device="cpu"):
    skip_unless_available(backend, device, FAMILY)
    return backends.implementation(FAMILY, backend)


def make(rows, classes, ignore="some", device="cpu", dtype=torch.float32, seed=0):
    """Student and teacher logits [rows, classes] and targets with the given ignored rows (-100)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.5, 6.0, rows).unsqueeze(1)  # flat to peaked distributions
    s = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * spread).to(device=device, dtype=dtype)
    t = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * spread).to(device=device, dtype=dtype)
    y = torch.randint(0, classes, (rows,), generator=gen)
    if ignore == "some":
        y[::3] = -100
    elif ignore == "all":
        y[:] = -100
    return s, t, (None if ignore == "no-target" else y.to(device))


def kwargs(temp, alpha, kind, beta=0.5, reduction="batchmean", scale=None):
    return dict(temperature=temp, alpha=alpha, kind=kind, beta=beta, scale=temp * temp if scale is None else scale,
                ignore_index=-100, reduction=reduction)


def expected(s, t, y, **kw):
    return ref.distill_loss_fwd(s.double(), t.double(), y, **kw)


def check(backend, s, t, y, dtype, **kw):
    loss, grad = impl(backend, s.device).distill_loss_fwd(s, t, y, **kw)
    want, want_grad = expected(s, t, y, **kw)
    classes = s.shape[1]
    assert loss.dtype == s.dtype and grad.dtype == s.dtype and grad.shape == s.shape
    assert_close(loss, want, dtype=dtype, reduction_length=classes)
    assert_close(grad, want_grad, dtype=dtype, reduction_length=classes)
    return loss, grad


@pytest.mark.parametrize("kind,temp,alpha,shape,ignore", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp32(backend, kind, temp, alpha, shape, ignore):
    if ignore == "no-target" and alpha < 1:
        ignore = "some"  # alpha < 1 needs targets
    s, t, y = make(*shape, ignore)
    loss, grad = check(backend, s, t, y, torch.float32, **kwargs(temp, alpha, kind, beta=0.3))
    if ignore == "all":
        assert float(loss) == 0.0 and bool((grad == 0).all())
    elif ignore == "some":
        assert bool((grad[::3] == 0).all()), "ignored rows must get an exactly zero gradient"


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend, reduction):
    s, t, y = make(7, 100)
    for kind in KINDS:
        loss, _ = check(backend, s, t, y, torch.float32, **kwargs(2.0, 0.5, kind, reduction=reduction))
        assert loss.shape == ((7,) if reduction == "none" else ())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision(backend, dtype):
    """bf16/fp16 logits, math in float32, loss and gradient rounded once to the logits' dtype."""
    for kind, (rows, classes) in zip(KINDS, [(7, 1000), (5, 33), (3, 300)]):
        s, t, y = make(rows, classes, dtype=dtype)
        check(backend, s, t, y, dtype, **kwargs(2.0, 0.5, kind))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_beta_endpoints_are_the_kls(backend):
    """The TRL / Liger convention: jsd with beta 0 is KL(p_t || p_s), with beta 1 KL(p_s || p_t)."""
    s, t, y = make(7, 33)
    f = impl(backend).distill_loss_fwd
    for beta, kind in ((0.0, "kl"), (1.0, "reverse_kl")):
        got = f(s, t, y, **kwargs(2.0, 0.5, "jsd", beta=beta))
        want = f(s, t, y, **kwargs(2.0, 0.5, kind, beta=beta))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert_close(got[0], expected(s, t, y, **kwargs(2.0, 0.5, kind))[0], dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_gradient(backend):
    s, t, y = make(7, 100)
    f = impl(backend).distill_loss_fwd
    for kind in KINDS:
        loss, grad = f(s, t, y, need_grad=False, **kwargs(2.0, 0.5, kind))
        assert grad.numel() == 0
        assert_close(loss, expected(s, t, y, **kwargs(2.0, 0.5, kind))[0], dtype=torch.float32, reduction_length=100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    s, t, y = make(0, 33)
    for reduction in ("batchmean", "none"):
        loss, grad = impl(backend).distill_loss_fwd(s, t, y, **kwargs(2.0, 0.5, "kl", reduction=reduction))
        assert grad.shape == (0, 33)
        assert loss.shape == ((0,) if reduction == "none" else ()) and not bool(loss.isnan().any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_name_the_argument(backend):
    f = impl(backend).distill_loss_fwd
    s, t, y = make(3, 10)
    good = kwargs(2.0, 0.5, "kl")
    bad = [(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"), (dict(alpha=1.5), "alpha"),
           (dict(beta=-0.1), "beta"), (dict(kind="kld"), "kind"), (dict(reduction="avg"), "reduction")]
    for change, name in bad:
        with pytest.raises(ValueError, match=name):
            f(s, t, y, **{**good, **change})
    with pytest.raises(ValueError, match="target"):
        f(s, t, None, **good)
    with pytest.raises(ValueError, match="target"):
        f(s, t, y[:2], **good)
    with pytest.raises(ValueError, match="teacher"):
        f(s, t[:, :5].contiguous(), y, **good)
    with pytest.raises(ValueError, match="student"):
        f(s.reshape(-1), t.reshape(-1), y, **good)
    with pytest.raises(TypeError, match="teacher"):
        f(s, t.double(), y, **good)


def test_cpu_target_out_of_range():
    f = impl("cpu").distill_loss_fwd
    s, t, y = make(3, 10, ignore="none")
    y[1] = 10
    with pytest.raises(ValueError, match=r"target\[1\] = 10"):
        f(s, t, y, **kwargs(2.0, 0.5, "kl"))


def test_opcheck():
    """torch.library.opcheck: schema, fake kernel and dispatch of the registered op on CPU."""
    skip_unless_available("cpu", "cpu", FAMILY)
    s, t, y = make(5, 40)
    for kw in (kwargs(2.0, 0.5, "kl"), kwargs(1.0, 1.0, "jsd", reduction="none")):
        torch.library.opcheck(torch.ops.nnopt.distill_loss_fwd, (s, t, y), kw)
    torch.library.opcheck(torch.ops.nnopt.distill_loss_fwd, (s, t, None), {**kwargs(1.0, 1.0, "reverse_kl"),
                                                                            "need_grad": False})


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_triton_bf16_cuda(kind):
    """The compiled Triton kernel on CUDA (not the interpreter): bf16 logits over a vocabulary of LLM size (50,257
    classes: 13 chunks of 4,096 and a partial one), ignored rows, every kind, loss and gradient against the float64
    reference within bf16 tolerance, and no host synchronisation during the call."""
    f = impl("triton", "cuda").distill_loss_fwd
    s, t, y = make(33, 50257, device="cuda", dtype=torch.bfloat16)
    kw = kwargs(2.0, 0.5, kind, beta=0.3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, grad = f(s, t, y, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, want_grad = expected(s, t, y, **kw)
    assert_close(loss, want, dtype=torch.bfloat16, reduction_length=50257)
    assert_close(grad, want_grad, dtype=torch.bfloat16, reduction_length=50257)
    assert bool((grad[::3] == 0).all())
