"""nadam_step, radam_step, adamax_step and lion_step at the function level: every backend × device × dtype × flag
against nnopt.reference.fused_optim, with the list builders of test_fused_optim.py."""

import itertools

import pytest
import torch

from nnopt import backends
from nnopt.reference import fused_optim as ref
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available
from tests.kernels import test_fused_optim as base

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention

BACKENDS = ["triton", "cuda", "cpu"]

# op -> (state list names, {flag: values}, fixed hyperparameters), as test_fused_optim.OPS
OPS = {
    "nadam_step": (("exp_avgs", "exp_avg_sqs"), dict(decoupled=[False, True], maximize=[False, True]),
                   dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, momentum_decay=4e-3)),
    "radam_step": (("exp_avgs", "exp_avg_sqs"), dict(decoupled=[False, True], maximize=[False, True]),
                   dict(lr=0.01, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0.1)),
    "adamax_step": (("exp_avgs", "exp_infs"), dict(weight_decay=[0.0, 0.1], maximize=[False, True]),
                    dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)),
    "lion_step": (("exp_avgs",), dict(weight_decay=[0.0, 0.1], maximize=[False, True]),
                  dict(lr=0.01, beta1=0.9, beta2=0.99)),
    "lamb_step": (("exp_avgs", "exp_avg_sqs"),
                  dict(adam_w_mode=[False, True], weight_decay=[0.0, 0.1], max_grad_norm=[0.0, 1.0]),
                  dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, grad_averaging=True, use_nvlamb=False,
                       bias_correction=True, maximize=False)),
}
base.OPS.update(OPS)  # the shared list builders look states up there; the base module's cases are already fixed
CASES = [(op, dict(zip(f, v))) for op, (_, f, _) in OPS.items() for v in itertools.product(*f.values())]
CASE_IDS = [f"{op}-" + "-".join(f"{k}={v}" for k, v in f.items()) for op, f in CASES]
SIZES = base.SIZES
STEPS = 8  # RAdam (beta2 = 0.9) rectifies from step 6: both branches run


def count_scalars(op, hyper, k, mu_product):
    """The host-computed count-derived arguments of step k (NAdam: also the float32 mu_product after it)."""
    if op == "nadam_step":
        bc2, mu, mu_next = ref.nadam_scalars(hyper["beta1"], hyper["beta2"], hyper["momentum_decay"], k)
        mu_product = float(torch.tensor(mu_product, dtype=torch.float32) * mu)
        return dict(bias_correction2=bc2, mu=mu, mu_next=mu_next, mu_product=mu_product), mu_product
    if op == "radam_step":
        bc1, bc2_sqrt, rect = ref.radam_scalars(hyper["beta1"], hyper["beta2"], k)
        return dict(bias_correction1=bc1, bias_correction2_sqrt=bc2_sqrt, rect=rect), mu_product
    if op == "adamax_step":
        return dict(bias_correction1=1 - hyper["beta1"] ** k), mu_product
    if op == "lamb_step":
        return dict(bias_correction1=1 - hyper["beta1"] ** k, bias_correction2=1 - hyper["beta2"] ** k), mu_product
    return {}, mu_product


def run(impl, op, lists, flags, steps, device, step_tensor=False, **extra):
    mu_product = 1.0
    for k in range(1, steps + 1):
        lists["grads"] = [torch.randn_like(g) for g in lists["grads"]]
        hyper = dict(OPS[op][2], **flags, l1=0.0)
        scalars, mu_product = count_scalars(op, hyper, k, mu_product)
        hyper.update(scalars, **extra)
        if op == "lamb_step":  # the global norm of the (scaled) gradients, as LAMB passes it
            hyper["grad_norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in lists["grads"]])).reshape(1)
        if step_tensor and op != "lion_step":
            hyper["step"] = torch.tensor(float(k), device=device)
            for key in scalars:  # deliberately wrong: the step tensor must override them
                hyper[key] = 0.37
            if op == "nadam_step":
                hyper["mu_product_tensor"] = torch.tensor([mu_product], device=device)
        args = [lists["params"], lists["grads"]] + [lists[n] for n in OPS[op][0]] + [lists["masters"], lists["masks"]]
        getattr(impl, op)(*args, **hyper)


def run_and_compare(backend, device, op, flags, dtype=torch.float32, master=False, masked=False, step_tensor=False,
                    **extra):
    skip_unless_available(backend, device)
    ours = base.make_lists(op, flags, SIZES, device, dtype, master, masked)
    theirs = base.clone_lists(ours)
    seed = torch.randint(0, 2**31, ()).item()
    for impl, lists, use_step in ((backends.implementation("fused_optim", backend), ours, step_tensor),
                                  (ref, theirs, False)):
        torch.manual_seed(seed)  # the same fresh gradients for both
        run(impl, op, lists, flags, STEPS, device, use_step, **extra)
    for key in ours:
        for a, b in zip(ours[key], theirs[key]):
            if a.dtype != torch.bool:
                assert_close(a, b, dtype if key == "params" else (torch.float32 if master else dtype),
                             msg=f"{key} differ")
    if masked:
        for key in ours:
            if key not in ("grads", "masks"):
                for t, m in zip(ours[key], ours["masks"]):
                    assert (t[~m] == 0).all(), f"masked entries of {key} are not exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,flags", CASES, ids=CASE_IDS)
def test_matches_reference_fp32(backend, device, op, flags):
    run_and_compare(backend, device, op, flags)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("op,flags", CASES[::4], ids=CASE_IDS[::4])
def test_step_tensor_replaces_count_derived_scalars(backend, device, op, flags):
    """Device-resident counts (and NAdam's mu_product) give the update the host-computed scalars give."""
    run_and_compare(backend, device, op, flags, step_tensor=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,flags", CASES[1::4], ids=CASE_IDS[1::4])
def test_masks_l1_lr_tensor_grad_scale(backend, device, op, flags):
    run_and_compare(backend, device, op, flags, masked=True, l1=0.01, lr_tensor=torch.tensor([0.05], device=device),
                    grad_scale=torch.tensor([4.0], device=device), found_inf=torch.tensor([0.0], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_found_inf_changes_nothing(backend, device, op):
    skip_unless_available(backend, device)
    flags = {k: v[-1] for k, v in OPS[op][1].items()}
    lists = base.make_lists(op, flags, SIZES, device, torch.float32, masked=True)
    before = base.clone_lists(lists)
    run(backends.implementation("fused_optim", backend), op, lists, flags, 1, device,
        found_inf=torch.tensor([1.0], device=device), grad_scale=torch.tensor([2.0], device=device))
    for key in lists:
        if key != "grads":
            for a, b in zip(lists[key], before[key]):
                assert torch.equal(a, b), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,flags", CASES[2::4], ids=CASE_IDS[2::4])
def test_fp64(backend, device, op, flags):
    run_and_compare(backend, device, op, flags, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,flags", CASES[3::4], ids=CASE_IDS[3::4])
def test_low_precision_with_masters(backend, device, op, flags, dtype):
    run_and_compare(backend, device, op, flags, dtype=dtype, master=True, masked=True)


def test_opcheck():
    """torch.library.opcheck: schema and fake kernels of the four ops on CPU."""
    skip_unless_available("cpu", "cpu")
    for op, flags in CASES[::4]:
        lists = base.make_lists(op, flags, [(7,), (3, 2)], "cpu", torch.float32, masked=True)
        hyper = dict(OPS[op][2], **flags, l1=0.0)
        hyper.update(count_scalars(op, hyper, 3, 0.5)[0])
        args = [lists["params"], lists["grads"]] + [lists[n] for n in OPS[op][0]] + [lists["masters"], lists["masks"]]
        if op == "lamb_step":
            hyper["grad_norm"] = torch.tensor([3.0])
        torch.library.opcheck(getattr(torch.ops.nnopt, f"{op}_"), tuple(args), hyper,
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.nnopt.l2_norms, ([torch.randn(5), torch.randn(3, 2)],),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_l2_norms(backend, device, dtype):
    skip_unless_available(backend, device)
    impl = backends.implementation("fused_optim", backend)
    ts = [torch.randn(s, device=device).to(dtype) for s in SIZES + [(0,), (40000,)]]
    got = impl.l2_norms(ts)
    want = torch.stack([t.double().norm() for t in ts]).float()
    assert got.dtype == torch.float32 and got.shape == (len(ts),)
    assert_close(got, want, torch.float32, reduction_length=40000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend):
    skip_unless_available(backend, "cpu")
    impl = backends.implementation("fused_optim", backend)
    good = base.make_lists("adamax_step", {}, [(5,), (3,)], "cpu", torch.float32)
    hyper = dict(OPS["adamax_step"][2], weight_decay=0.0, maximize=False, l1=0.0, bias_correction1=0.1)
    with pytest.raises((ValueError, RuntimeError), match="exp_infs"):
        impl.adamax_step(good["params"], good["grads"], good["exp_avgs"], good["exp_infs"][:1], [], [], **hyper)
    with pytest.raises((TypeError, RuntimeError), match="exp_avgs"):
        impl.adamax_step(good["params"], good["grads"], [t.double() for t in good["exp_avgs"]], good["exp_infs"], [],
                         [], **hyper)
