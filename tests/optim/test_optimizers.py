"""Every nnopt optimizer × its options × every backend available here against torch.optim's for-loop path.

One harness for all five optimizers: a model whose parameters include a 0-dim scalar, odd sizes, a transposed
(non-contiguous but dense) and a strided (non-dense) view; fresh random gradients each step; 10+ steps; then
parameters and every state compared with nnopt.testing's tolerance for the dtype.
"""

import copy

import pytest
import torch

import nnopt.optim as nno
from nnopt import sparsity
from nnopt.testing import SIZES_FULL, SIZES_QUICK, assert_close
from tests.conftest import skip_unless_available

# (optimizer name, constructor kwargs): each option of each optimizer at least once.
CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.8), weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.01, maximize=True, eps=1e-3)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, amsgrad=True, weight_decay=0.5, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, centered=True, maximize=True, eps=1e-4)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CONFIGS]
BACKENDS = ["triton", "cpu", "torch"]
STEPS = 10


def make_params(backend, dtype=torch.float32, device="cpu"):
    """Scalar, odd sizes, a transposed view and a strided view (the large size only off the interpreter)."""
    sizes = SIZES_QUICK if backend == "triton" and device == "cpu" else SIZES_FULL
    ps = [torch.randn(s, dtype=dtype, device=device) for s in sizes]
    ps.append(torch.randn(9, 5, dtype=dtype, device=device).t())  # non-contiguous, dense
    ps.append(torch.randn(6, 10, dtype=dtype, device=device)[:, ::3])  # non-contiguous, not dense
    return [torch.nn.Parameter(p) for p in ps]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def set_grads(*param_lists, dtype=None):
    for ps in zip(*param_lists):
        g = torch.randn_like(ps[0], dtype=dtype or ps[0].dtype)
        for p in ps:
            p.grad = g.clone().to(p.dtype)


def torch_twin(name, params, kwargs):
    return getattr(torch.optim, name)(params, foreach=False, **kwargs)


def assert_same_state(a, b, params_a, params_b, dtype=torch.float32):
    for pa, pb in zip(params_a, params_b):
        assert_close(pa.detach(), pb.detach(), dtype)
        sa, sb = a.state[pa], b.state[pb]
        assert set(sb) <= set(sa), (set(sa), set(sb))
        for k, v in sb.items():
            assert_close(sa[k], v, dtype, msg=f"state {k!r}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_matches_torch(name, kwargs, backend):
    check_parity(name, kwargs, backend, "cpu")


def check_parity(name, kwargs, backend, device):
    """nnopt's optimizer on ``backend`` and torch.optim's for-loop twin, STEPS steps from the same start."""
    skip_unless_available(backend, device)
    ps = make_params(backend, device=device)
    qs = clone_params(ps)
    ours = getattr(nno, name)(ps, backend=backend, **kwargs)
    ref = torch_twin(name, qs, kwargs)
    for _ in range(STEPS):
        set_grads(ps, qs)
        ours.step()
        ref.step()
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_schedulers_and_tensor_lr(name, backend):
    """lr (and Adam's betas) change every step; lr given as a tensor; two param groups, one added later."""
    skip_unless_available(backend, "cpu")
    kwargs = dict(lr=torch.tensor(0.05)) if name != "SGD" else dict(lr=torch.tensor(0.05), momentum=0.9)
    ps, qs = make_params("triton"), None
    qs = clone_params(ps)
    ours = getattr(nno, name)(ps[:3], backend=backend, **kwargs)
    ref = torch_twin(name, qs[:3], kwargs)
    sched = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (ours, ref)]
    for step in range(STEPS):
        if step == 3:
            ours.add_param_group({"params": ps[3:], "lr": 0.02})
            ref.add_param_group({"params": qs[3:], "lr": 0.02})
        if "betas" in ours.param_groups[0]:
            for o in (ours, ref):
                o.param_groups[0]["betas"] = (0.9 - 0.02 * step, 0.999)
        set_grads(ps, qs)
        ours.step()
        ref.step()
        for s in sched:
            s.step()
    assert_same_state(ours, ref, ps, qs)


def test_closure_and_zero_grad():
    model = torch.nn.Linear(7, 3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 7), torch.randn(16, 3)
    ours, ref = nno.Adam(model.parameters(), lr=0.01), torch.optim.Adam(twin.parameters(), lr=0.01, foreach=False)
    for _ in range(5):
        for m, o in ((model, ours), (twin, ref)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss

            loss = o.step(closure)
            assert loss is not None
    ours.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("direction", ["torch_to_nnopt", "nnopt_to_torch"])
@pytest.mark.parametrize("name,kwargs", [c for c in CONFIGS if c[0] in ("AdamW", "SGD", "Adagrad", "RMSprop")][::2])
def test_state_dict_round_trip(name, kwargs, direction):
    """A checkpoint of one side loads into the other and training continues identically."""
    ps = make_params("cpu")
    qs = clone_params(ps)
    first = getattr(nno, name)(ps, **kwargs) if direction == "nnopt_to_torch" else torch_twin(name, ps, kwargs)
    for _ in range(3):
        set_grads(ps)
        first.step()
    sd = copy.deepcopy(first.state_dict())
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    second = torch_twin(name, qs, kwargs) if direction == "nnopt_to_torch" else getattr(nno, name)(qs, **kwargs)
    second.load_state_dict(sd)
    for _ in range(STEPS):
        set_grads(ps, qs)
        first.step()
        second.step()
    ours, theirs = (second, first) if direction == "torch_to_nnopt" else (first, second)
    p_ours, p_theirs = (qs, ps) if direction == "torch_to_nnopt" else (ps, qs)
    assert_same_state(ours, theirs, p_ours, p_theirs)
    for p in qs:
        st = second.state[p]
        if "step" in st:
            assert st["step"].device.type == "cpu" and st["step"].dtype == torch.float32


def test_state_dict_keys_match_torch():
    ps = make_params("cpu")
    qs = clone_params(ps)
    ours, ref = nno.AdamW(ps, amsgrad=True), torch.optim.AdamW(qs, amsgrad=True)
    set_grads(ps, qs)
    ours.step()
    ref.step()
    so, sr = ours.state_dict(), ref.state_dict()
    assert so["state"].keys() == sr["state"].keys()
    for k in sr["state"]:
        assert so["state"][k].keys() == sr["state"][k].keys()
    assert set(sr["param_groups"][0]) <= set(so["param_groups"][0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIGS[1::2], ids=IDS[1::2])
def test_masked_entries_stay_zero(name, kwargs, backend):
    skip_unless_available(backend, "cpu")
    ps = make_params(backend)
    masks = [torch.rand(p.shape) > 0.4 for p in ps]
    opt = getattr(nno, name)(ps, backend=backend, **kwargs)
    set_grads(ps)
    opt.step()  # states exist and are nonzero before the masks arrive
    for p, m in zip(ps, masks):
        sparsity.set_mask(p, m)
    qs = clone_params(ps)
    ref = getattr(nno, name)(qs, backend="torch", **kwargs)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for q, m in zip(qs, masks):
        sparsity.set_mask(q, m)
    for _ in range(STEPS):
        set_grads(ps, qs)
        opt.step()
        ref.step()
    for p, m in zip(ps, masks):
        assert (p[~m] == 0).all()
        for k, v in opt.state[p].items():
            if k != "step":
                assert (v[~m] == 0).all(), k
    assert_same_state(opt, ref, ps, qs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIGS[::3], ids=IDS[::3])
def test_l1_matches_reference_and_makes_zeros(name, kwargs, backend):
    skip_unless_available(backend, "cpu")
    ps = make_params(backend)
    qs = clone_params(ps)
    l1 = 0.05 / kwargs["lr"]  # a threshold of 0.05 per step: some entries reach 0 within the run, most do not
    ours = getattr(nno, name)(ps, backend=backend, l1=l1, **kwargs)
    ref = getattr(nno, name)(qs, backend="torch", l1=l1, **kwargs)
    for _ in range(STEPS):
        set_grads(ps, qs)
        ours.step()
        ref.step()
    assert_same_state(ours, ref, ps, qs)
    assert sum(int((p == 0).sum()) for p in ps) > 0
    for p, q in zip(ps, qs):
        assert torch.equal(p == 0, q == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["SGD", "AdamW", "Adagrad", "RMSprop"])
def test_master_weights(name, dtype, backend):
    """Low-precision params with fp32 masters track an fp32 run; the master sits in the state and state_dict."""
    skip_unless_available(backend, "cpu")
    kwargs = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    ps32 = make_params(backend)
    ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in ps32]
    qs = [torch.nn.Parameter(p.detach().to(dtype).float()) for p in ps32]  # fp32 twin from the same start
    ours = getattr(nno, name)(ps, backend=backend, master_weights=True, **kwargs)
    ref = getattr(torch.optim, name)(qs, foreach=False, **kwargs)
    for _ in range(STEPS):
        set_grads(qs)
        for p, q in zip(ps, qs):
            p.grad = q.grad.to(dtype)
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        master = ours.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_close(p.detach(), q.detach().to(dtype), dtype)
        assert torch.equal(p.detach(), master.to(dtype))
    sd = ours.state_dict()
    fresh = getattr(nno, name)([torch.nn.Parameter(p.detach().clone()) for p in ps], master_weights=True, **kwargs)
    fresh.load_state_dict(sd)
    for p in fresh.param_groups[0]["params"]:
        assert all(v.dtype == torch.float32 for k, v in fresh.state[p].items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "AdamW", "Adagrad", "RMSprop"])
def test_grad_scaler_skips_non_finite_step(name, backend):
    skip_unless_available(backend, "cpu")
    kwargs = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.05)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    ours = getattr(nno, name)(model.parameters(), backend=backend, **kwargs)
    ref = getattr(torch.optim, name)(twin.parameters(), foreach=False, **kwargs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for step in range(6):
        for m, o, s in ((model, ours, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            s.scale(loss).backward()
            if step == 3:
                next(m.parameters()).grad[0, 0] = float("inf")
                before = [p.detach().clone() for p in m.parameters()]
                states = copy.deepcopy(o.state_dict()["state"])
            s.step(o)
            s.update()
            if step == 3:
                assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
                after = o.state_dict()["state"]
                for k in states:
                    for key, v in states[k].items():
                        assert torch.equal(v, after[k][key]), key
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_backend_call_per_group(backend, monkeypatch):
    """Fused: one kernel call per (device, dtype) group however many tensors — here 300 tensors, two dtypes."""
    skip_unless_available(backend, "cpu")
    from nnopt import backends

    calls = []
    real = backends.implementation

    def counting(family, name):
        impl = real(family, name)

        class Wrapped:
            def __getattr__(self, op):
                fn = getattr(impl, op)
                return lambda *a, **k: (calls.append(op), fn(*a, **k))[1]

        return Wrapped()

    monkeypatch.setattr(backends, "implementation", counting)
    ps = [torch.nn.Parameter(torch.randn(3, dtype=torch.float32 if i % 2 else torch.float64)) for i in range(300)]
    opt = nno.AdamW(ps, backend=backend)
    set_grads(ps)
    opt.step()
    assert calls == ["adam_step", "adam_step"]


def test_sparse_and_complex_follow_torch():
    """Sparse gradients in SGD/Adagrad and complex parameters give torch's result; sparse Adam raises."""
    for name in ("SGD", "Adagrad"):
        emb, twin = torch.nn.Embedding(10, 4, sparse=True), None
        twin = copy.deepcopy(emb)
        ours, ref = getattr(nno, name)(emb.parameters(), lr=0.1), getattr(torch.optim, name)(twin.parameters(), lr=0.1)
        idx = torch.tensor([1, 3, 3, 7])
        for m, o in ((emb, ours), (twin, ref)):
            m(idx).sum().backward()
            o.step()
        assert_close(emb.weight.detach(), twin.weight.detach())
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        nno.Adam(emb.parameters()).step()
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop"):
        p = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64))
        q = torch.nn.Parameter(p.detach().clone())
        ours, ref = getattr(nno, name)([p], lr=0.1), getattr(torch.optim, name)([q], lr=0.1, foreach=False)
        for _ in range(4):
            set_grads([p], [q])
            ours.step()
            ref.step()
        assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_bad_input_raises(name):
    cls = getattr(nno, name)
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="learning rate"):
        cls(p, lr=-1.0)
    if name != "SGD":
        with pytest.raises(ValueError, match="epsilon"):
            cls(p, eps=-1.0)
    if name in ("Adam", "AdamW"):
        with pytest.raises(ValueError, match="beta parameter at index 0"):
            cls(p, betas=(1.0, 0.9))
        with pytest.raises(ValueError, match="beta parameter at index 1"):
            cls(p, betas=(0.9, -0.1))
    with pytest.raises(TypeError, match="parameter 1 of param group 0 has dtype torch.int64"):
        cls([torch.randn(2), torch.zeros(2, dtype=torch.long)], lr=0.1)
    with pytest.raises(ValueError, match="l1"):
        cls(p, lr=0.1, l1=-1.0)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        cls(p, lr=0.1, backend="tpu")


def test_bad_input_leaves_nothing_half_updated():
    good = torch.nn.Parameter(torch.randn(4))
    bad = torch.nn.Parameter(torch.randn(4))
    opt = nno.AdamW([{"params": [good]}, {"params": [bad]}])
    good.grad, bad.grad = torch.randn(4), torch.randn(4)
    bad.data = bad.data.double()  # its gradient stays float32
    before = good.detach().clone()
    with pytest.raises(TypeError, match="parameter 0 of param group 1 has dtype torch.float64"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state[good]) == 0


def test_forced_unavailable_backend_names_what_is_missing():
    from nnopt import BackendUnavailable

    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with pytest.raises(BackendUnavailable, match="backend 'cuda' is unavailable: backend 'cuda' needs CUDA tensors"):
        nno.SGD([p], lr=0.1, backend="cuda").step()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_matches_torch_on_cuda(name, kwargs, backend):
    """On a GPU: the same parity with torch.optim (for-loop) on CUDA tensors, odd sizes and views included."""
    check_parity(name, kwargs, backend, "cuda")


# -- the cached launch plan: every change a user can make between steps is seen -----------------------------


def _twins(name, kwargs, backend="cpu", n=4):
    skip_unless_available(backend, "cpu")
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(n)]
    qs = clone_params(ps)
    return ps, qs, getattr(nno, name)(ps, backend=backend, **kwargs), torch_twin(name, qs, kwargs)


def _steps(ps, qs, ours, ref, k=3, only=None):
    for _ in range(k):
        set_grads(ps, qs)
        if only is not None:
            for i in range(len(ps)):
                if i not in only:
                    ps[i].grad = qs[i].grad = None
        ours.step()
        ref.step()


def test_plan_sees_replaced_state_tensors_and_dicts():
    ps, qs, ours, ref = _twins("Adam", dict(lr=0.01))
    _steps(ps, qs, ours, ref)
    for o, x in ((ours, ps), (ref, qs)):
        o.state[x[0]]["exp_avg"] = torch.zeros(5, 3)
        o.state[x[1]] = {}
        o.state[x[2]]["step"] = torch.tensor(0.0)
    _steps(ps, qs, ours, ref)
    assert_same_state(ours, ref, ps, qs)


def test_plan_sees_replaced_params_and_grads_on_some_steps():
    ps, qs, ours, ref = _twins("AdamW", dict(lr=0.01))
    _steps(ps, qs, ours, ref)
    _steps(ps, qs, ours, ref, only={0, 2})
    new_p, new_q = [torch.nn.Parameter(torch.randn(2))], None
    new_q = clone_params(new_p)
    ours.param_groups[0]["params"][1] = new_p[0]
    ref.param_groups[0]["params"][1] = new_q[0]
    ps[1], qs[1] = new_p[0], new_q[0]
    _steps(ps, qs, ours, ref)
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("name,change", [("SGD", dict(momentum=0.9)), ("RMSprop", dict(centered=True)),
                                         ("RMSprop", dict(momentum=0.5)), ("Adam", dict(amsgrad=True))])
def test_plan_sees_changed_options(name, change):
    """Options that add state take effect on the next step (torch raises KeyError for the last three; nnopt
    creates the missing state, so only nnopt's reference is compared there)."""
    ps, qs, ours, ref = _twins(name, dict(lr=0.01))
    if name != "SGD":
        ref = getattr(nno, name)(qs, backend="torch", lr=0.01)
    _steps(ps, qs, ours, ref)
    for o in (ours, ref):
        o.param_groups[0].update(change)
    _steps(ps, qs, ours, ref)
    assert_same_state(ours, ref, ps, qs)


def test_plan_sees_new_masks_and_replaced_data():
    ps, qs, ours, ref = _twins("AdamW", dict(lr=0.01))
    _steps(ps, qs, ours, ref)
    mask = torch.rand(5, 3) > 0.5
    sparsity.set_mask(ps[0], mask)
    ref_m = getattr(nno, "AdamW")(qs, backend="torch", lr=0.01)
    ref_m.load_state_dict(copy.deepcopy(ref.state_dict()))
    sparsity.set_mask(qs[0], mask.clone())
    _steps(ps, qs, ours, ref_m)
    assert (ps[0][~mask] == 0).all()
    with torch.no_grad():
        for x in (ps, qs):
            x[1].data = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    _steps(ps, qs, ours, ref_m)
    assert_same_state(ours, ref_m, ps, qs)


def test_layouts_transposed_channels_last_and_strided():
    """Dense non-contiguous params (transposed, channels_last) and strided views all match torch."""
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    ours, ref = nno.AdamW(conv.parameters(), lr=0.01), torch.optim.AdamW(twin.parameters(), lr=0.01, foreach=False)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for _ in range(4):
        for m, o in ((conv, ours), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_state(ours, ref, list(conv.parameters()), list(twin.parameters()))


def test_launches_stay_one_per_group_across_steps(monkeypatch):
    from nnopt import backends

    calls = []
    real = backends.implementation
    monkeypatch.setattr(backends, "implementation",
                        lambda f, n: type("W", (), {"adam_step": lambda self, *a, **k: (calls.append(1),
                                                                                     real(f, n).adam_step(*a, **k))})())
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(200)]
    opt = nno.AdamW(ps, backend="torch")
    for step in range(3):
        set_grads(ps)
        opt.param_groups[0]["lr"] = 0.01 * (step + 1)
        opt.step()
    assert len(calls) == 3


def test_sgd_first_step_skipped_by_grad_scaler_matches_torch():
    """A skipped first momentum step must leave SGD's next step a first step (buf = g), with dampening too."""
    ps, qs, ours, ref = _twins("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5))
    for step in range(4):
        set_grads(ps, qs)
        # What GradScaler.step sets on an optimizer that supports AMP scaling (torch's for-loop SGD does not).
        ours.grad_scale, ours.found_inf = torch.tensor(1.0), torch.tensor(1.0 if step == 0 else 0.0)
        if step == 0:
            ref_state = copy.deepcopy(ref.state_dict())
        ours.step()
        if step > 0:
            ref.step()
    assert ref_state["state"] == {} and all("momentum_buffer" in ours.state[p] for p in ps)
    del ours.grad_scale, ours.found_inf
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(lr=0.01, amsgrad=True)), ("Adam", dict(lr=0.01)),
                                         ("Adagrad", dict(lr=0.1, lr_decay=0.05)), ("RMSprop", dict(lr=0.01)),
                                         ("SGD", dict(lr=0.1, momentum=0.9))])
def test_device_step_counts_are_never_read_on_the_host(name, kwargs, backend, monkeypatch):
    """Step counts kept where the kernels read them (as for CUDA parameters; forced here on CPU tensors): with
    GradScaler's found_inf, a cached-plan step reads no tensor on the host (a read would be a GPU sync), skips
    the non-finite steps (counts included) and matches torch.optim stepping only on the finite ones."""
    from nnopt.optim._fused import FusedOptimizer

    monkeypatch.setattr(FusedOptimizer, "_counts_on_device", staticmethod(lambda device: True))
    ps, qs, ours, ref = _twins(name, kwargs, backend)
    watched = set()  # storages of found_inf, grad_scale and the step counts: on a GPU, reading them syncs

    def guard(original):
        def read(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() in watched:
                raise AssertionError("found_inf, grad_scale or a step count was read on the host during step()")
            return original(self, *args, **kwargs)
        return read

    for step in range(7):
        set_grads(ps, qs)
        for p in ps:
            p.grad.mul_(4.0)  # scaled by grad_scale (a power of two: unscaling is exact)
        skip = step in (2, 4, 5)
        ours.grad_scale, ours.found_inf = torch.tensor(4.0), torch.tensor(1.0 if skip else 0.0)
        watched = {t.untyped_storage().data_ptr() for t in (ours.grad_scale, ours.found_inf)}
        watched |= {st["step"].untyped_storage().data_ptr() for st in ours.state.values() if "step" in st}
        with monkeypatch.context() as m:
            if step >= 2:  # the first steps build the plan (SGD: twice), which may read counts and found_inf
                for attr in ("item", "__bool__", "__float__", "__int__", "tolist"):
                    m.setattr(torch.Tensor, attr, guard(getattr(torch.Tensor, attr)))
            ours.step()
        if not skip:
            ref.step()
    del ours.grad_scale, ours.found_inf
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["AdamW", "Adagrad", "RMSprop", "SGD"])
def test_grad_scaler_step_never_syncs_on_cuda(name, backend):
    """On a GPU, under torch.amp.GradScaler: once the plan is built (first steps), optimizer.step() makes no
    host synchronisation (torch.cuda.set_sync_debug_mode("error") turns one into an error), skips the step with
    an inf gradient (parameters and states unchanged) and matches torch.optim (for-loop) with its own scaler."""
    skip_unless_available(backend, "cuda")
    kwargs = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.05)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).cuda()
    twin = copy.deepcopy(model)
    ours = getattr(nno, name)(model.parameters(), backend=backend, **kwargs)
    ref = getattr(torch.optim, name)(twin.parameters(), foreach=False, **kwargs)
    step_once = ours.step

    def no_sync_step(*args, **kw):
        torch.cuda.set_sync_debug_mode("error" if n >= 2 else "default")
        try:
            return step_once(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    ours.step = no_sync_step
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**8) for _ in range(2)]
    x, y = torch.randn(8, 6, device="cuda"), torch.randn(8, 2, device="cuda")
    for n in range(6):
        for m, o, s in ((model, ours, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if n == 3:
                next(m.parameters()).grad[0, 0] = float("inf")
            s.step(o)
            s.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert_same_state(ours, ref, list(model.parameters()), list(twin.parameters()))


def test_sparse_gradient_with_grad_scale():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    twin = copy.deepcopy(emb)
    ours, ref = nno.SGD(emb.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    idx = torch.tensor([1, 3, 3, 7])
    emb(idx).sum().mul(8.0).backward()
    twin(idx).sum().backward()
    ours.grad_scale, ours.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    ours.step()
    ref.step()
    assert_close(emb.weight.detach(), twin.weight.detach())
    ours.found_inf = torch.tensor(1.0)
    before = emb.weight.detach().clone()
    ours.step()
    assert torch.equal(before, emb.weight.detach())


def test_sparse_gradient_in_a_later_group_leaves_nothing_half_updated():
    good = torch.nn.Parameter(torch.randn(4))
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = nno.Adam([{"params": [good]}, {"params": emb.parameters()}])
    good.grad = torch.randn(4)
    emb(torch.tensor([1])).sum().backward()
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state[good]) == 0


def test_rejected_param_group_is_not_added():
    opt = nno.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.long)]})
    assert len(opt.param_groups) == 1  # (duplicates warn, as in torch: tests/optim/test_step_edge_cases.py)


def test_torch_checkpoint_keeps_nnopt_options():
    ps = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps])
    ours = nno.AdamW(ps, master_weights=True, l1=0.01, backend="torch")
    ours.load_state_dict(theirs.state_dict())
    g = ours.param_groups[0]
    assert (g["master_weights"], g["l1"], g["backend"], g["decoupled_weight_decay"]) == (True, 0.01, "torch", True)


def test_sync_master_weights():
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.bfloat16))
    opt = nno.SGD([p], lr=0.1, master_weights=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    with torch.no_grad():
        p.fill_(7)
    opt.sync_master_weights()
    opt.step()
    assert (p == 7).all()
