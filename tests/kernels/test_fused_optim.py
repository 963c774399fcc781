"""The fused_optim family at the function level: every backend × device × dtype × flag against the reference.

One harness builds parallel lists (params, grads, states, masters, masks) of odd sizes, runs the same calls
through nnopt.reference.fused_optim and through the backend under test for several steps, and compares every
list. The `gpu` tests add bf16/fp16, masters and a tensor of more than 2**31 elements (64-bit offsets).
"""

import itertools
import math

import pytest
import torch

from nnopt import backends
from nnopt.reference import fused_optim as ref
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

BACKENDS = ["triton", "cuda", "cpu"]

# op -> (state list names, {flag: values}, fixed hyperparameters)
OPS = {
    "sgd_step": (("momentum_buffers",), dict(momentum=[0.0, 0.9], nesterov=[False, True], maximize=[False, True]),
                 dict(lr=0.1, dampening=0.0, weight_decay=0.01)),
    "adam_step": (("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
                  dict(amsgrad=[False, True], decoupled=[False, True], maximize=[False, True]),
                  dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)),
    "adagrad_step": (("state_sums",), dict(maximize=[False, True], weight_decay=[0.0, 0.1]),
                     dict(lr=0.1, eps=1e-10, lr_decay_denom=1.0)),
    "rmsprop_step": (("square_avgs", "momentum_buffers", "grad_avgs"),
                     dict(centered=[False, True], momentum=[0.0, 0.9], maximize=[False, True]),
                     dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1)),
}


def cases():
    for op, (_, flags, _) in OPS.items():
        for values in itertools.product(*flags.values()):
            yield op, dict(zip(flags, values))


CASES = list(cases())
CASE_IDS = [f"{op}-" + "-".join(f"{k}={v}" for k, v in f.items()) for op, f in CASES]


def used_states(op, flags):
    names = OPS[op][0]
    if op == "sgd_step":
        return names if flags["momentum"] else ()
    if op == "adam_step":
        return names if flags["amsgrad"] else names[:2]
    if op == "rmsprop_step":
        return tuple(n for n in names if n == "square_avgs" or (n == "momentum_buffers" and flags["momentum"])
                     or (n == "grad_avgs" and flags["centered"]))
    return names


# The five base ops; test_fused_optim_more adds its ops to OPS (for the shared list builders) and checks them itself.
BASE_OPS = tuple(OPS)

def make_lists(op, flags, sizes, device, dtype, master=False, masked=False):
    ps = [torch.randn(s, device=device).to(dtype) for s in sizes]
    sdtype = torch.float32 if master else dtype
    lists = {"params": ps, "grads": [torch.randn_like(p) for p in ps]}
    for name in OPS[op][0]:
        # Realistic states: second moments positive, first moments small (so centered RMSprop stays >= 0).
        first_moment = name in ("exp_avgs", "grad_avgs", "momentum_buffers")
        make = (lambda p: 0.05 * torch.randn(p.shape, device=device)) if first_moment else (
            lambda p: 0.1 + torch.rand(p.shape, device=device))
        lists[name] = [make(p).to(sdtype) for p in ps] if name in used_states(op, flags) else []
    lists["masters"] = [p.float() for p in ps] if master else []
    lists["masks"] = [torch.rand(p.shape, device=device) > 0.3 for p in ps] if masked else []
    return lists


def call(impl, op, lists, flags, k, **extra):
    """Step number k of `op` on `lists` (host-computed count-derived scalars unless `extra` has a step tensor)."""
    hyper = dict(OPS[op][2], **flags, **extra)
    hyper.setdefault("l1", 0.0)
    if op == "adam_step" and "step" not in extra:
        hyper["bias_correction1"] = 1 - hyper["beta1"] ** k
        hyper["bias_correction2_sqrt"] = math.sqrt(1 - hyper["beta2"] ** k)
    if op == "sgd_step":
        hyper["first_step"] = k == 1
    args = [lists["params"], lists["grads"]] + [lists[n] for n in OPS[op][0]] + [lists["masters"], lists["masks"]]
    getattr(impl, op)(*args, **hyper)


def clone_lists(lists):
    return {k: [t.clone() for t in v] for k, v in lists.items()}


def run_and_compare(backend, device, op, flags, sizes, dtype=torch.float32, master=False, masked=False, steps=4,
                    **extra):
    skip_unless_available(backend, device)
    impl = backends.implementation("fused_optim", backend)
    ours = make_lists(op, flags, sizes, device, dtype, master, masked)
    theirs = clone_lists(ours)
    for step in range(1, steps + 1):
        fresh = [torch.randn_like(g) for g in ours["grads"]]
        ours["grads"], theirs["grads"] = fresh, [g.clone() for g in fresh]
        call(impl, op, ours, flags, step, **extra)
        call(ref, op, theirs, flags, step, **extra)
    check_dtype = torch.float32 if master else dtype
    for key in ours:
        for a, b in zip(ours[key], theirs[key]):
            if a.dtype == torch.bool:
                continue
            assert_close(a, b, dtype if key == "params" else check_dtype, msg=f"{key} differ")
    if masked:
        for key in ours:
            if key in ("grads", "masks"):
                continue
            for t, m in zip(ours[key], ours["masks"]):
                assert (t[~m] == 0).all(), f"masked entries of {key} are not exactly 0"


SIZES = [(), (1,), (17,), (1000,), (3, 67)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,flags", CASES, ids=CASE_IDS)
def test_matches_reference_fp32(backend, device, op, flags):
    run_and_compare(backend, device, op, flags, SIZES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,flags", CASES[::3], ids=CASE_IDS[::3])
def test_masks_l1_lr_tensor_grad_scale(backend, device, op, flags):
    lr_tensor = torch.tensor([0.05], device=device)
    run_and_compare(backend, device, op, flags, SIZES, masked=True, l1=0.01, lr_tensor=lr_tensor,
                    grad_scale=torch.tensor([4.0], device=device), found_inf=torch.tensor([0.0], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_found_inf_changes_nothing(backend, device, op):
    skip_unless_available(backend, device)
    flags = {k: v[-1] for k, v in OPS[op][1].items()}
    lists = make_lists(op, flags, SIZES, device, torch.float32, masked=True)
    before = clone_lists(lists)
    call(backends.implementation("fused_optim", backend), op, lists, flags, 1,
         found_inf=torch.tensor([1.0], device=device), grad_scale=torch.tensor([2.0], device=device))
    for key in lists:
        for a, b in zip(lists[key], before[key]):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("op", ["adam_step", "adagrad_step"])
def test_step_tensor_replaces_count_derived_scalars(backend, device, op):
    """A step count passed as a tensor (how the optimizers pass device-resident counts) gives the update the
    host-computed scalars give, and overrides them (deliberately wrong here)."""
    skip_unless_available(backend, device)
    impl = backends.implementation("fused_optim", backend)
    flags = {k: v[-1] for k, v in OPS[op][1].items()}
    ours = make_lists(op, flags, SIZES, device, torch.float32)
    theirs = clone_lists(ours)
    for step in (1, 2, 7, 1000):
        fresh = [torch.randn_like(g) for g in ours["grads"]]
        ours["grads"], theirs["grads"] = fresh, [g.clone() for g in fresh]
        count = torch.tensor(float(step), device=device)
        if op == "adam_step":
            call(impl, op, ours, flags, step, step=count, bias_correction1=123.0, bias_correction2_sqrt=4.0)
            call(impl, op, theirs, flags, step)
        else:
            call(impl, op, ours, flags, step, step=count, lr_decay=0.05, lr_decay_denom=99.0)
            call(impl, op, theirs, flags, step, lr_decay_denom=1 + (step - 1) * 0.05)
    for key in ours:
        for a, b in zip(ours[key], theirs[key]):
            assert_close(a, b, msg=f"{key} differ")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,flags", CASES[::4], ids=CASE_IDS[::4])
def test_fp64(backend, device, op, flags):
    run_and_compare(backend, device, op, flags, SIZES, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("op,flags", CASES[::5], ids=CASE_IDS[::5])
def test_low_precision(backend, device, op, flags, dtype, master):
    run_and_compare(backend, device, op, flags, SIZES, dtype=dtype, master=master, masked=master)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend):
    skip_unless_available(backend, "cpu")
    impl = backends.implementation("fused_optim", backend)
    flags = dict(amsgrad=False, decoupled=True, maximize=False)
    good = make_lists("adam_step", flags, [(5,), (3,)], "cpu", torch.float32)

    def attempt(**changes):
        lists = clone_lists(good)
        lists.update(changes)
        call(impl, "adam_step", lists, flags, 1)

    with pytest.raises((ValueError, RuntimeError), match="grads"):
        attempt(grads=good["grads"][:1])
    with pytest.raises((ValueError, RuntimeError), match="exp_avgs"):
        attempt(exp_avgs=[torch.zeros(4), torch.zeros(3)])
    with pytest.raises((TypeError, RuntimeError), match="grads"):
        attempt(grads=[g.double() for g in good["grads"]])
    with pytest.raises((TypeError, RuntimeError), match="params"):
        attempt(params=[torch.zeros(5, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)],
                grads=[torch.zeros(5, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)])
    with pytest.raises((ValueError, RuntimeError), match="masks"):
        attempt(masks=[torch.ones(5, dtype=torch.bool)])
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        attempt(exp_avgs=[torch.zeros(10)[::2], torch.zeros(3)])
    if backend != "cpu":  # on the C++ path a meta tensor routes the whole call to the fake kernel
        with pytest.raises((ValueError, RuntimeError), match="device|is on meta"):
            attempt(grads=[torch.zeros(5, device="meta"), torch.zeros(3)])


def test_opcheck():
    """torch.library.opcheck: schema, fake kernels and dispatch of every registered op on CPU."""
    skip_unless_available("cpu", "cpu")
    flags_for = {op: {k: v[-1] for k, v in OPS[op][1].items()} for op in BASE_OPS}
    for op in BASE_OPS:
        lists = make_lists(op, flags_for[op], [(7,), (3, 2)], "cpu", torch.float32, masked=True)
        hyper = dict(OPS[op][2], **flags_for[op], l1=0.0)
        if op == "adam_step":
            hyper.update(bias_correction1=0.1, bias_correction2_sqrt=0.05)
        if op == "sgd_step":
            hyper.update(first_step=False)
        args = [lists["params"], lists["grads"]] + [lists[n] for n in OPS[op][0]] + [lists["masters"], lists["masks"]]
        torch.library.opcheck(getattr(torch.ops.nnopt, f"{op}_"), tuple(args), hyper,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_than_2_31_elements(backend):
    """64-bit offsets: a 2**31 + 33 element tensor (bf16, ~4 GiB per list) updated to its last entries."""
    skip_unless_available(backend, "cuda")
    n = 2**31 + 33
    impl = backends.implementation("fused_optim", backend)
    p = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    impl.sgd_step([p], [g], [], [], [], lr=0.5, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                  maximize=False, l1=0.0, first_step=False)
    assert p[-40:].float().eq(-0.5).all() and p[:8].float().eq(-0.5).all()
    assert int((p == -0.5).sum()) == n


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_step_has_no_host_sync(backend):
    """A whole nnopt AdamW step on CUDA runs with torch's sync debug mode set to error."""
    skip_unless_available(backend, "cuda")
    import nnopt.optim

    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(1000,), (17,), (64, 64)]]
    opt = nnopt.optim.AdamW(ps, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # first step creates state (allocations) outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
