"""The select family: the radix-select histogram of every backend against the reference, and the exact k-th
smallest value (nnopt.prune._select.kth_smallest) of every backend against torch.kthvalue on a concatenation.

Inputs are fresh random lists of odd sizes with negative values, masks (some None), ties, signed zeros and
infinities, in float32, float64, bfloat16 and float16 (and a mixed list); k = 1, k = all and values between.
"""

import pytest
import torch

from nnopt import backends
from nnopt.prune import _select
from nnopt.reference import select as ref
from tests.conftest import skip_unless_available

BACKENDS = ["triton", "cuda", "cpu", "torch"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SIZES = [(), (1,), (17,), (64 + 17,), (7, 13), (3, 5, 11)]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # multi-chunk tensors on the interpreter, as in test_fused_optim
    if backends.triton_missing() is None:
        from nnopt.kernels import _multi_tensor

        monkeypatch.setattr(_multi_tensor, "CHUNK", 64)
        monkeypatch.setattr(_multi_tensor, "BLOCK", 16)


def make(device, dtype, sizes=SIZES, masked=True, ties=False, special=False):
    scores = []
    for i, s in enumerate(sizes):
        x = torch.randn(s, dtype=torch.float64) * (0.1 + 3 * torch.rand(()).item())
        if ties:
            x = (x * 4).round() / 4  # few distinct values: many ties
        scores.append(x.to(device=device, dtype=dtype))
    if special:
        flat = scores[-1].reshape(-1)
        flat[:4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")], dtype=dtype)
    masks = [(torch.rand(s, device=device) > 0.3) if masked and i % 2 == 0 else None
             for i, s in enumerate(sizes)]
    return scores, masks


def eligible(scores, masks):
    return torch.cat([(s.reshape(-1) if m is None else s[m]).double().cpu() for s, m in zip(scores, masks)])


def expected(scores, masks, k, magnitude=False):
    e = eligible(scores, masks)
    if magnitude:
        e = e.abs()
    tau = torch.kthvalue(e, k).values.item()
    return tau, int((e < tau).sum())


def ks(n):
    return sorted({1, 2, n // 3 + 1, (n + 1) // 2, n - 1 if n > 1 else 1, n})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kth_smallest_matches_kthvalue(backend, device, dtype):
    skip_unless_available(backend, device, "select")
    for trial in range(2):
        scores, masks = make(device, dtype, ties=trial == 1, special=trial == 1)
        n = eligible(scores, masks).numel()
        for k in ks(n):
            got = _select.kth_smallest(scores, masks, k, backend=backend)
            assert got == expected(scores, masks, k), (k, got)
            assert isinstance(got[0], float) and isinstance(got[1], int)
            got = _select.kth_smallest(scores, masks, k, backend=backend, magnitude=True)
            assert got == expected(scores, masks, k, magnitude=True), (k, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kth_smallest_mixed_dtypes_and_no_masks(backend, device):
    skip_unless_available(backend, device, "select")
    scores = [torch.randn(s, device=device).to(dt) for s, dt in
              [((31,), torch.float32), ((7, 3), torch.bfloat16), ((65,), torch.float16)]]
    scores64 = scores + [torch.randn(9, device=device, dtype=torch.float64)]
    for sc in (scores, scores64):
        masks = [None] * len(sc)
        n = sum(s.numel() for s in sc)
        for k in ks(n):
            assert _select.kth_smallest(sc, None, k, backend=backend) == expected(sc, masks, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda", "cpu"])
def test_histogram_matches_reference(backend, device, dtype):
    """Every pass's histogram (first field and a prefixed one) equals the reference's, bin for bin."""
    skip_unless_available(backend, device, "select")
    impl = backends.implementation("select", backend)
    scores, masks = make(device, dtype, sizes=SIZES + [(1000,)], ties=True, special=True)
    key_bits = _select.key_bits_of([dtype])
    for bits in (8, 16):
        for shift, prefix in ((key_bits - bits, 0), (key_bits - 2 * bits, None)):
            if shift < 0:
                continue
            if prefix is None:  # the top field of the first nonzero score, so the prefix matches some entries
                prefix = int(ref.order_keys(scores[-1], key_bits)[0]) >> (shift + bits) & ((1 << bits) - 1)
            want = ref.select_histogram(torch.zeros(1 << bits, dtype=torch.int64, device=device), scores, masks,
                                        key_bits, shift, bits, prefix)
            got = torch.full((1 << bits,), 5, dtype=torch.int64, device=device)  # accumulates into hist
            impl.select_histogram(got, scores, masks, key_bits, shift, bits, prefix)
            assert torch.equal(got - 5, want), (bits, shift)
            want = ref.select_histogram(torch.zeros_like(got), scores, masks, key_bits, shift, bits, prefix, True)
            got.zero_()
            impl.select_histogram(got, scores, masks, key_bits, shift, bits, prefix, True)
            assert torch.equal(got, want), (bits, shift, "magnitude")


def test_reference_matches_kthvalue_with_ties_and_nan():
    """The reference against torch.kthvalue on one concatenation, with ties, NaN (ranked last) and masks."""
    scores = [torch.tensor([3.0, 1.0, float("nan"), 1.0]), torch.tensor([[2.0, -0.0], [0.0, 1.0]])]
    masks = [None, torch.tensor([[True, True], [True, False]])]
    flat = torch.cat([scores[0], scores[1][masks[1]]])
    for k in range(1, flat.numel() + 1):
        tau, n_less = ref.kth_smallest(scores, masks, k)
        want = torch.kthvalue(flat, k).values.item()  # kthvalue also ranks NaN last
        assert (tau == want) or (tau != tau and want != want), k
        if tau == tau:
            assert n_less == int((flat < tau).sum()), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_k_raises(backend, device):
    skip_unless_available(backend, device, "select")
    scores, masks = make(device, torch.float32)
    n = eligible(scores, masks).numel()
    for k in (0, -1, n + 1):
        with pytest.raises(ValueError, match=f"k={k}"):
            _select.kth_smallest(scores, masks, k, backend=backend)
    with pytest.raises(ValueError, match="k=1"):
        _select.kth_smallest([], [], 1, backend=backend)
    with pytest.raises(ValueError, match="k=1"):  # nothing eligible
        _select.kth_smallest([torch.ones(3, device=device)], [torch.zeros(3, dtype=torch.bool, device=device)], 1,
                             backend=backend)
    with pytest.raises(TypeError, match="k must be an int"):
        _select.kth_smallest(scores, masks, 1.5, backend=backend)
    with pytest.raises(TypeError, match=r"scores\[0\]"):
        _select.kth_smallest([torch.ones(3, dtype=torch.int64, device=device)], None, 1, backend=backend)


def test_non_contiguous_scores():
    base = torch.randn(9, 14)
    scores, masks = [base[:, ::2], base.t()], [base[:, ::2] > 0, None]
    for backend in backends.BACKENDS:
        if backends.missing(backend, "cpu", "select") is None:
            assert _select.kth_smallest(scores, masks, 20, backend=backend) == expected(scores, masks, 20)


def test_histogram_opcheck():
    skip_unless_available("cpu", "cpu", "select")
    scores, masks = make("cpu", torch.float32)
    hist = torch.zeros(1 << 8, dtype=torch.int64)
    torch.library.opcheck(torch.ops.nnopt.select_histogram_, (hist, scores, masks, 32, 24, 8, 0))
    torch.library.opcheck(torch.ops.nnopt.select_histogram_, (hist, scores, masks, 32, 16, 8, 190))


def test_cpu_histogram_bad_inputs():
    skip_unless_available("cpu", "cpu", "select")
    op = torch.ops.nnopt.select_histogram_
    s = [torch.randn(5)]
    with pytest.raises(RuntimeError, match="key_bits"):
        op(torch.zeros(256, dtype=torch.int64), s, [None], 24, 16, 8, 0)
    with pytest.raises(RuntimeError, match="hist"):
        op(torch.zeros(255, dtype=torch.int64), s, [None], 32, 24, 8, 0)
    with pytest.raises(RuntimeError, match="key_bits=16"):
        op(torch.zeros(256, dtype=torch.int64), s, [None], 16, 8, 8, 0)
    with pytest.raises(RuntimeError, match=r"masks\[0\]"):
        op(torch.zeros(256, dtype=torch.int64), s, [torch.ones(4, dtype=torch.bool)], 32, 24, 8, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_on_gpu(backend):
    """A model-sized list (~20M entries in tensors of mixed sizes) on the GPU."""
    skip_unless_available(backend, "cuda", "select")
    from nnopt.kernels import _multi_tensor

    _multi_tensor.CHUNK, _multi_tensor.BLOCK = 16384, 1024
    scores = [torch.randn(s, device="cuda") for s in [(4096, 4096), (4096,), (1000, 777), (3,)]]
    masks = [torch.rand(s.shape, device="cuda") > 0.1 if i % 2 == 0 else None for i, s in enumerate(scores)]
    e = eligible(scores, masks)
    for k in (1, e.numel() // 10, int(e.numel() * 0.9), e.numel()):
        assert _select.kth_smallest(scores, masks, k, backend=backend) == expected(scores, masks, k)
