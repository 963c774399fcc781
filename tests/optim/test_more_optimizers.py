"""NAdam, RAdam, Adamax (against torch.optim's for-loop path) and Lion (against a plain-torch reference written from
the paper) × options × every backend available here, with the harness of test_optimizers.py: odd sizes, a scalar,
transposed and strided views, fresh gradients each step, parameters and every state compared."""

import copy

import pytest
import torch

import nnopt.optim as nno
from nnopt import sparsity
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available
from tests.optim.test_optimizers import STEPS, assert_same_state, clone_params, make_params, set_grads


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention

class PaperLion(torch.optim.Optimizer):
    """Lion as Algorithm 2 of Chen et al. 2023 states it (decoupled weight decay scaled by lr), in plain torch."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = m.mul(beta1).add(g, alpha=1 - beta1).sign()
                p.mul_(1 - lr * group["weight_decay"]).add_(update, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)


class ApexLAMB(torch.optim.Optimizer):
    """LAMB as apex's FusedLAMB documents and computes it (csrc/multi_tensor_lamb.cu), in plain torch: global
    gradient-norm clipping over all groups, Adam moments, the per-tensor trust ratio ||p||/||u|| (lr when either
    norm is 0, or without weight decay unless use_nvlamb)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 adam_w_mode=True, grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False):
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay, grad_averaging=grad_averaging,
                                      max_grad_norm=max_grad_norm))
        self.adam_w_mode, self.use_nvlamb = adam_w_mode, use_nvlamb

    @torch.no_grad()
    def step(self):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        global_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        max_norm = self.defaults["max_grad_norm"]
        clip = float(global_norm / max_norm) if max_norm > 0 and global_norm > max_norm else 1.0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            lr, wd = float(group["lr"]), group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                bc1 = 1 - beta1 ** float(st["step"]) if group["bias_correction"] else 1.0
                bc2 = 1 - beta2 ** float(st["step"]) if group["bias_correction"] else 1.0
                g = p.grad / clip
                if not self.adam_w_mode:
                    g = g + wd * p
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=beta3)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                u = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
                if self.adam_w_mode:
                    u = u + wd * p
                p_norm, u_norm = float(p.norm()), float(u.norm())
                ratio = lr
                if (self.use_nvlamb or wd != 0) and p_norm != 0 and u_norm != 0:
                    ratio = lr * p_norm / u_norm
                p.add_(u, alpha=-ratio)


# (optimizer name, constructor kwargs): each option at least once.
CONFIGS = [
    ("NAdam", dict(lr=0.01)),
    ("NAdam", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.1, momentum_decay=0.05, maximize=True)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-4)),
    ("RAdam", dict(lr=0.01)),
    ("RAdam", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, maximize=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-4)),
    ("Adamax", dict(lr=0.01)),
    ("Adamax", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.1, eps=1e-3, maximize=True)),
    ("Lion", dict(lr=0.01)),
    ("Lion", dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.5, maximize=True)),
    ("LAMB", dict(lr=0.01)),
    ("LAMB", dict(lr=0.01, adam_w_mode=False, weight_decay=0.1, max_grad_norm=0.5, grad_averaging=False)),
    ("LAMB", dict(lr=0.01, weight_decay=0.0, max_grad_norm=0.0, bias_correction=False, betas=(0.8, 0.9))),
    ("LAMB", dict(lr=0.01, weight_decay=0.0, use_nvlamb=True, max_grad_norm=100.0)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CONFIGS]
BACKENDS = ["triton", "cpu", "torch"]
TORCH_HAS = ("NAdam", "RAdam", "Adamax")
NAMES = ["NAdam", "RAdam", "Adamax", "Lion", "LAMB"]


def twin(name, params, kwargs):
    """The oracle: torch.optim's for-loop path, or the paper's plain-torch Lion."""
    if name == "Lion":
        return PaperLion(params, **kwargs)
    if name == "LAMB":
        return ApexLAMB(params, **kwargs)
    return getattr(torch.optim, name)(params, foreach=False, **kwargs)


def run_pair(ours, ref, ps, qs, steps=STEPS):
    for _ in range(steps):
        set_grads(ps, qs)
        ours.step()
        ref.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_matches_torch(name, kwargs, backend):
    skip_unless_available(backend, "cpu")
    ps = make_params(backend)
    qs = clone_params(ps)
    ours, ref = getattr(nno, name)(ps, backend=backend, **kwargs), twin(name, qs, kwargs)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("name", NAMES)
def test_float64_and_complex(name):
    ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(), (5, 3), (33,)]]
    if name in TORCH_HAS:  # the papers' Lion and LAMB have no complex form
        ps.append(torch.nn.Parameter(torch.randn(7, dtype=torch.complex64)))
    qs = clone_params(ps)
    ours, ref = getattr(nno, name)(ps, lr=0.01), twin(name, qs, dict(lr=0.01))
    run_pair(ours, ref, ps, qs)
    for p, q in zip(ps, qs):
        assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_schedulers_tensor_lr_and_late_groups(name, backend):
    skip_unless_available(backend, "cpu")
    kwargs = dict(lr=torch.tensor(0.05))
    ps = make_params("triton")
    qs = clone_params(ps)
    ours, ref = getattr(nno, name)(ps[:3], backend=backend, **kwargs), twin(name, qs[:3], kwargs)
    sched = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (ours, ref)]
    for step in range(STEPS):
        if step == 3:
            ours.add_param_group({"params": ps[3:], "lr": 0.02})
            ref.add_param_group({"params": qs[3:], "lr": 0.02})
        run_pair(ours, ref, ps, qs, steps=1)
        for s in sched:
            s.step()
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("direction", ["torch_to_nnopt", "nnopt_to_torch"])
@pytest.mark.parametrize("name,kwargs", [c for c in CONFIGS if c[0] in TORCH_HAS][::2])
def test_state_dict_round_trip(name, kwargs, direction):
    """A checkpoint of one side loads into the other (same state keys) and training continues identically."""
    ps = make_params("triton")
    qs = clone_params(ps)
    first = getattr(nno, name)(ps, **kwargs) if direction == "nnopt_to_torch" else twin(name, ps, kwargs)
    for _ in range(3):
        set_grads(ps)
        first.step()
    sd = copy.deepcopy(first.state_dict())
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    second = twin(name, qs, kwargs) if direction == "nnopt_to_torch" else getattr(nno, name)(qs, **kwargs)
    second.load_state_dict(sd)
    assert second.state_dict()["state"][0].keys() == sd["state"][0].keys()
    run_pair(first, second, ps, qs)
    ours, theirs = (second, first) if direction == "torch_to_nnopt" else (first, second)
    p_ours, p_theirs = (qs, ps) if direction == "torch_to_nnopt" else (ps, qs)
    assert_same_state(ours, theirs, p_ours, p_theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIGS[1::2], ids=IDS[1::2])
def test_masked_entries_stay_zero(name, kwargs, backend):
    skip_unless_available(backend, "cpu")
    ps = make_params("triton")
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
    run_pair(opt, ref, ps, qs)
    for p, m in zip(ps, masks):
        assert (p[~m] == 0).all()
        for k, v in opt.state[p].items():
            if k not in ("step", "mu_product"):
                assert (v[~m] == 0).all(), k
    assert_same_state(opt, ref, ps, qs)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("name,kwargs", CONFIGS[::3], ids=IDS[::3])
def test_l1_matches_reference(name, kwargs, backend):
    skip_unless_available(backend, "cpu")
    ps = make_params("triton")
    qs = clone_params(ps)
    l1 = 0.02 / kwargs["lr"]
    ours = getattr(nno, name)(ps, backend=backend, l1=l1, **kwargs)
    ref = getattr(nno, name)(qs, backend="torch", l1=l1, **kwargs)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs)
    assert sum(int((p == 0).sum()) for p in ps) > 0


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("name", NAMES + ["Adafactor"])
def test_master_weights(name, backend):
    """bf16 params with fp32 masters, given bf16 gradients, track an fp32 run of the oracle from the same start with
    the same gradients: the master to fp32 rounding, the parameter to its bf16 rounding."""
    skip_unless_available(backend, "cpu")
    dtype = torch.bfloat16
    ps32 = make_params("triton")
    ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in ps32]
    qs = [torch.nn.Parameter(p.detach().to(dtype).float()) for p in ps32]
    ours = getattr(nno, name)(ps, backend=backend, master_weights=True, lr=0.01)
    ref = twin(name, qs, dict(lr=0.01))
    for _ in range(STEPS):
        set_grads(ps)
        for p, q in zip(ps, qs):
            q.grad = p.grad.float()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        master = ours.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_close(master, q.detach())
        assert torch.equal(p.detach(), master.to(dtype))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("name", NAMES + ["Adafactor"])
def test_grad_scaler_skips_non_finite_step(name, backend):
    skip_unless_available(backend, "cpu")
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    twin_model = copy.deepcopy(model)
    ours = getattr(nno, name)(model.parameters(), backend=backend, lr=0.05)
    ref = twin(name, list(twin_model.parameters()), dict(lr=0.05))
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for step in range(6):
        for m, o, s in ((model, ours, scalers[0]), (twin_model, ref, scalers[1])):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
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
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise_torchs_messages(name):
    cls = getattr(nno, name)
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        cls(p, lr=-1.0)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls(p, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0: 1.0"):
        cls(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: -0.1"):
        cls(p, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="Invalid weight_decay value: -0.1"):
        cls(p, weight_decay=-0.1)
    if name != "Lion":
        with pytest.raises(ValueError, match="Invalid epsilon value: -1.0"):
            cls(p, eps=-1.0)
    if name == "NAdam":
        with pytest.raises(ValueError, match="Invalid momentum_decay value: -1.0"):
            cls(p, momentum_decay=-1.0)
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        cls(emb.parameters()).step()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_matches_torch_on_cuda(name, kwargs, backend):
    """On a GPU: parity with the oracle on CUDA tensors (device step counts and NAdam's device mu_product)."""
    skip_unless_available(backend, "cuda")
    ps = make_params(backend, device="cuda")
    qs = clone_params(ps)
    ours, ref = getattr(nno, name)(ps, backend=backend, **kwargs), twin(name, qs, kwargs)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs)


# -- Muon: torch.optim.Muon's math with the Newton–Schulz chain batched per shape ---------------------------------

MUON_CONFIGS = [
    dict(lr=0.02),
    dict(lr=0.02, nesterov=False, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.02, momentum=0.8, ns_steps=3, eps=1e-5, adjust_lr_fn="original", ns_coefficients=(3.0, -3.2, 1.2)),
]


def muon_params(n_each=3):
    """Equal shapes (batched together), a tall and a wide matrix (NS transposes the tall one), a 1-row matrix."""
    shapes = [(12, 20)] * n_each + [(20, 12)] * n_each + [(7, 7), (1, 9)]
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", MUON_CONFIGS)
def test_muon_matches_torch(kwargs, backend):
    """Fused momentum and parameter steps around the batched bf16 chain: parameters and buffers equal torch's for-loop
    Muon to float32 rounding over 10 steps."""
    skip_unless_available(backend, "cpu")
    ps = muon_params()
    qs = clone_params(ps)
    ours, ref = nno.Muon(ps, backend=backend, **kwargs), torch.optim.Muon(qs, **kwargs)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs)


def test_muon_batches_newton_schulz_per_shape(monkeypatch):
    from nnopt.optim import muon

    calls = []
    real = muon.newton_schulz
    monkeypatch.setattr(muon, "newton_schulz", lambda u, *a: (calls.append(tuple(u.shape)), real(u, *a))[1])
    ps = muon_params(n_each=5)
    opt = nno.Muon(ps)
    set_grads(ps)
    opt.step()
    assert sorted(calls) == sorted([(5, 12, 20), (5, 20, 12), (1, 7, 7), (1, 1, 9)])


@pytest.mark.parametrize("direction", ["torch_to_nnopt", "nnopt_to_torch"])
def test_muon_state_dict_round_trip(direction):
    ps = muon_params()
    qs = clone_params(ps)
    make = {"nnopt": nno.Muon, "torch": torch.optim.Muon}
    first_kind, second_kind = direction.split("_to_")
    first = make[first_kind](ps, lr=0.02)
    for _ in range(3):
        set_grads(ps)
        first.step()
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    second = make[second_kind](qs, lr=0.02)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run_pair(first, second, ps, qs)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_masks_and_grad_scaler(backend):
    skip_unless_available(backend, "cpu")
    ps = muon_params()
    masks = [torch.rand(p.shape) > 0.4 for p in ps]
    for p, m in zip(ps, masks):
        sparsity.set_mask(p, m)
        with torch.no_grad():
            p.mul_(m)
    opt = nno.Muon(ps, lr=0.02, backend=backend)
    for step in range(4):
        set_grads(ps)
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0 if step == 2 else 0.0)
        before = [p.detach().clone() for p in ps]
        opt.step()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, ps))
    for p, m in zip(ps, masks):
        assert (p[~m] == 0).all() and (opt.state[p]["momentum_buffer"][~m] == 0).all()
        assert (p[m] != 0).all()


def test_muon_bad_arguments_raise_torchs_messages():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -1.0"):
        nno.Muon(p, lr=-1.0)
    with pytest.raises(ValueError, match="momentum should be >= 0 but is: -1"):
        nno.Muon(p, momentum=-1)
    with pytest.raises(ValueError, match="weight decay should be >= 0 but is: -1"):
        nno.Muon(p, weight_decay=-1)
    with pytest.raises(ValueError, match="Adjust learning rate function bad is not supported"):
        nno.Muon(p, adjust_lr_fn="bad")
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        nno.Muon([torch.nn.Parameter(torch.randn(3))])
    q = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    q.grad = torch.randn_like(q)
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        nno.Muon([q]).step()


# -- Adafactor: torch.optim.Adafactor's math on every backend -------------------------------------------------------

ADAFACTOR_CONFIGS = [
    dict(),
    dict(lr=0.05, weight_decay=0.1, maximize=True, d=1.5, eps=(1e-20, 1e-2), beta2_decay=-0.5),
    dict(lr=torch.tensor(0.003), eps=(1e-6, 1e-3)),
]
AF_IDS = ["defaults", "wd-maximize-d", "tensor-lr"]


def adafactor_params():
    """Equal shapes, a 0-dim and 1-D ones (full variance), 2-D and 3-D ones (factored), matrices of several tiles
    (more rows than a Triton tile, longer vectors than a tile row), a transposed and a strided view."""
    shapes = [(), (5,), (17,), (5,), (7, 13), (7, 13), (13, 7), (3, 4, 6), (1, 1), (37, 70), (200,)]
    ps = [torch.randn(s) for s in shapes] + [torch.randn(9, 5).t(), torch.randn(6, 10)[:, ::3]]
    return [torch.nn.Parameter(p) for p in ps]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", ADAFACTOR_CONFIGS, ids=AF_IDS)
def test_adafactor_matches_torch(kwargs, backend):
    skip_unless_available(backend, "cpu")
    ps = adafactor_params()
    qs = clone_params(ps)
    ours, ref = nno.Adafactor(ps, backend=backend, **kwargs), torch.optim.Adafactor(qs, foreach=False, **kwargs)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs)


def test_adafactor_float64():
    ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(), (5, 3), (33,), (2, 3, 4)]]
    qs = clone_params(ps)
    ours, ref = nno.Adafactor(ps, lr=0.01, backend="cpu"), torch.optim.Adafactor(qs, lr=0.01, foreach=False)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["torch_to_nnopt", "nnopt_to_torch"])
def test_adafactor_state_dict_round_trip(direction):
    ps = adafactor_params()
    qs = clone_params(ps)
    make = {"nnopt": nno.Adafactor, "torch": lambda p: torch.optim.Adafactor(p, foreach=False)}
    first_kind, second_kind = direction.split("_to_")
    first = make[first_kind](ps)
    for _ in range(3):
        set_grads(ps)
        first.step()
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    second = make[second_kind](qs)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run_pair(first, second, ps, qs)
    ours, theirs = (first, second) if first_kind == "nnopt" else (second, first)
    p_ours, p_theirs = (ps, qs) if first_kind == "nnopt" else (qs, ps)
    assert_same_state(ours, theirs, p_ours, p_theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adafactor_masks_and_grad_scaler(backend):
    """Masks arriving after the states exist: pruned entries of the parameter and of `variance` exactly 0, every
    backend equal to the torch backend; a GradScaler step with found_inf changes nothing."""
    skip_unless_available(backend, "cpu")
    ps = adafactor_params()[1:]
    kwargs = dict(lr=0.05, weight_decay=0.1)
    opt = nno.Adafactor(ps, backend=backend, **kwargs)
    set_grads(ps)
    opt.step()
    masks = [torch.rand(p.shape) > 0.4 for p in ps]
    for p, m in zip(ps, masks):
        sparsity.set_mask(p, m)
    qs = clone_params(ps)
    ref = nno.Adafactor(qs, backend="torch", **kwargs)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for q, m in zip(qs, masks):
        sparsity.set_mask(q, m)
    for step in range(4):
        set_grads(ps, qs)
        for o in (opt, ref):
            o.grad_scale, o.found_inf = torch.tensor(8.0), torch.tensor(1.0 if step == 2 else 0.0)
        before = [p.detach().clone() for p in ps]
        states = copy.deepcopy(opt.state_dict()["state"])
        opt.step()
        ref.step()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, ps))
            for k, st in opt.state_dict()["state"].items():
                assert all(torch.equal(v, states[k][key]) for key, v in st.items())
    for p, m in zip(ps, masks):
        assert (p[~m] == 0).all() and (p[m] != 0).all()
        if "variance" in opt.state[p]:
            assert (opt.state[p]["variance"][~m] == 0).all()
    for o in (opt, ref):
        del o.grad_scale, o.found_inf
    assert_same_state(opt, ref, ps, qs)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_adafactor_l1_matches_reference(backend):
    skip_unless_available(backend, "cpu")
    ps = adafactor_params()
    qs = clone_params(ps)
    ours = nno.Adafactor(ps, backend=backend, lr=0.05, l1=0.5)
    ref = nno.Adafactor(qs, backend="torch", lr=0.05, l1=0.5)
    run_pair(ours, ref, ps, qs, steps=4)
    assert_same_state(ours, ref, ps, qs)
    assert sum(int((p == 0).sum()) for p in ps) > 0


def test_adafactor_bad_arguments_raise_torchs_messages():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    for kwargs, message in [(dict(lr=-1.0), "Learning rate should be >= 0 but is: -1.0"),
                            (dict(beta2_decay=0.5), "beta2_decay should be <= 0 but is: 0.5"),
                            (dict(eps=(-1.0, 1e-3)), "epsilon1 should be >= 0 but is: -1.0"),
                            (dict(eps=(None, -1.0)), "epsilon2 should be >= 0 but is: -1.0"),
                            (dict(d=0.5), "Clipping threshold d should be >= 1 but is: 0.5"),
                            (dict(weight_decay=-1.0), "weight_decay should be >= 0 but is: -1.0"),
                            (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            nno.Adafactor(p, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "triton"])  # the reference reads found_inf on the host by design
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[4], CONFIGS[7], CONFIGS[11],
                                         ("Adafactor", ADAFACTOR_CONFIGS[1])],
                         ids=[IDS[1], IDS[4], IDS[7], IDS[11], "Adafactor"])
def test_device_step_counts_and_grad_scaler_never_read_on_the_host(name, kwargs, backend, monkeypatch):
    """Step counts (and NAdam's mu_product) kept where the kernels read them, as for CUDA parameters (forced here
    on CPU tensors): under GradScaler a cached-plan step reads none of them, nor found_inf or grad_scale, on the
    host, skips the non-finite steps and matches the oracle stepping only on the finite ones."""
    from nnopt.optim._fused import FusedOptimizer

    skip_unless_available(backend, "cpu")
    monkeypatch.setattr(FusedOptimizer, "_counts_on_device", staticmethod(lambda device: True))
    ps = make_params("triton")
    qs = clone_params(ps)
    ours, ref = getattr(nno, name)(ps, backend=backend, **kwargs), twin(name, qs, kwargs)
    watched = set()

    def guard(original):
        def read(self, *args, **kw):
            if self.untyped_storage().data_ptr() in watched:
                raise AssertionError("a step count, mu_product, found_inf or grad_scale was read on the host")
            return original(self, *args, **kw)
        return read

    for step in range(7):
        set_grads(ps, qs)
        for p in ps:
            p.grad.mul_(4.0)  # scaled by grad_scale (a power of two: unscaling is exact)
        skip = step in (2, 4, 5)
        ours.grad_scale, ours.found_inf = torch.tensor(4.0), torch.tensor(1.0 if skip else 0.0)
        watched = {t.untyped_storage().data_ptr() for t in (ours.grad_scale, ours.found_inf)}
        watched |= {st[k].untyped_storage().data_ptr() for st in ours.state.values() for k in ("step", "mu_product")
                    if k in st}
        with monkeypatch.context() as m:
            if step >= 1:  # the first step builds the plan, which may read counts
                for attr in ("item", "__bool__", "__float__", "__int__", "tolist"):
                    m.setattr(torch.Tensor, attr, guard(getattr(torch.Tensor, attr)))
            ours.step()
        if not skip:
            ref.step()
    del ours.grad_scale, ours.found_inf
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_muon_device_found_inf_is_never_read_on_the_host(backend, monkeypatch):
    """A found_inf off the CPU (simulated: CPU tensors take the device path) goes to the kernels, which skip the
    step; no host read of found_inf or grad_scale; finite steps match torch.optim.Muon."""
    from nnopt.optim import muon

    skip_unless_available(backend, "cpu")
    ps = muon_params()
    qs = clone_params(ps)
    ours, ref = nno.Muon(ps, lr=0.02, backend=backend), torch.optim.Muon(qs, lr=0.02)
    monkeypatch.setattr(muon, "_host_flag", lambda flag: False)
    for step in range(5):
        set_grads(ps, qs)
        for p in ps:
            p.grad.mul_(4.0)
        skip = step in (1, 3)
        ours.grad_scale, ours.found_inf = torch.tensor(4.0), torch.tensor(1.0 if skip else 0.0)
        watched = {t.untyped_storage().data_ptr() for t in (ours.grad_scale, ours.found_inf)}
        before = [p.detach().clone() for p in ps]

        def guard(original):
            def read(self, *args, **kw):
                if self.untyped_storage().data_ptr() in watched:
                    raise AssertionError("found_inf or grad_scale was read on the host")
                return original(self, *args, **kw)
            return read

        with monkeypatch.context() as m:
            for attr in ("item", "__bool__", "__float__"):
                m.setattr(torch.Tensor, attr, guard(getattr(torch.Tensor, attr)))
            ours.step()
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before, ps))
        else:
            ref.step()
    del ours.grad_scale, ours.found_inf
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_muon_l1_and_master_weights(backend):
    """l1 against the torch backend; bf16 parameters with fp32 masters track an fp32 torch.optim.Muon run."""
    skip_unless_available(backend, "cpu")
    ps = muon_params()
    qs = clone_params(ps)
    ours, ref = nno.Muon(ps, lr=0.02, l1=0.5, backend=backend), nno.Muon(qs, lr=0.02, l1=0.5, backend="torch")
    run_pair(ours, ref, ps, qs, steps=4)
    assert_same_state(ours, ref, ps, qs)
    assert sum(int((p == 0).sum()) for p in ps) > 0
    ps32 = muon_params()
    ps = [torch.nn.Parameter(p.detach().bfloat16()) for p in ps32]
    qs = [torch.nn.Parameter(p.detach().bfloat16().float()) for p in ps32]
    ours, ref = nno.Muon(ps, lr=0.02, master_weights=True, backend=backend), torch.optim.Muon(qs, lr=0.02)
    for _ in range(STEPS):
        set_grads(ps)
        for p, q in zip(ps, qs):
            q.grad = p.grad.float()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        master = ours.state[p]["master_param"]
        assert master.dtype == torch.float32 and ours.state[p]["momentum_buffer"].dtype == torch.float32
        assert_close(master, q.detach())
        assert torch.equal(p.detach(), master.bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kwargs", MUON_CONFIGS)
def test_muon_matches_torch_on_cuda(kwargs, backend):
    """On a GPU: parity with torch.optim.Muon on CUDA tensors over 10 steps (fp32 rounding of the fused steps)."""
    skip_unless_available(backend, "cuda")
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in muon_params()]
    qs = clone_params(ps)
    ours, ref = nno.Muon(ps, backend=backend, **kwargs), torch.optim.Muon(qs, **kwargs)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_adafactor_op_bad_inputs_name_the_argument(backend):
    """The op itself: a state of the wrong size or dtype is refused, naming the list and the index, before any
    tensor changes."""
    skip_unless_available(backend, "cpu")
    from nnopt import backends

    op = backends.implementation("fused_optim", backend).adafactor_step
    p, g = torch.randn(4, 6), torch.randn(4, 6)
    kw = dict(lr=0.01, beta2_decay=-0.8, eps1=1e-30, eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False, l1=0.0,
              step_count=1.0)
    before = p.clone()
    with pytest.raises((RuntimeError, ValueError), match=r"row_vars\[0\]"):
        op([p], [g], [torch.zeros(4, 2)], [torch.zeros(1, 6)], [], [], **kw)
    with pytest.raises((RuntimeError, TypeError), match=r"col_vars\[0\]"):
        op([p], [g], [torch.zeros(4, 1)], [torch.zeros(1, 6, dtype=torch.float64)], [], [], **kw)
    assert torch.equal(p, before)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kwargs", ADAFACTOR_CONFIGS, ids=AF_IDS)
def test_adafactor_matches_torch_on_cuda(kwargs, backend):
    """On a GPU: parity with torch.optim.Adafactor's for-loop path on CUDA tensors (device step counts), 10 steps."""
    skip_unless_available(backend, "cuda")
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in adafactor_params()]
    qs = clone_params(ps)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ours, ref = nno.Adafactor(ps, backend=backend, **kwargs), torch.optim.Adafactor(qs, foreach=False, **kwargs)
    run_pair(ours, ref, ps, qs)
    assert_same_state(ours, ref, ps, qs)


def test_opcheck_adafactor_and_muon_ops():
    """torch.library.opcheck: schemas and fake kernels of adafactor_step_, muon_momentum_ and muon_update_."""
    skip_unless_available("cpu", "cpu")
    p, g, m = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4, 6) > 0.3
    v, gv = torch.randn(5), torch.randn(5)
    kw = dict(lr=0.01, beta2_decay=-0.8, eps1=1e-30, eps2=1e-3, d=1.0, weight_decay=0.1, maximize=False, l1=0.0,
              step_count=2.0)
    args = ([p, v], [g, gv], [torch.rand(4, 1), torch.rand(5)], [torch.rand(1, 6), torch.empty(0)], [], [])
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.nnopt.adafactor_step_, args, kw, test_utils=utils)
    torch.library.opcheck(torch.ops.nnopt.muon_momentum_,
                          ([g], [torch.randn(4, 6)], [torch.empty(4, 6, dtype=torch.bfloat16)], [m]),
                          dict(momentum=0.9, nesterov=True), test_utils=utils)
    torch.library.opcheck(torch.ops.nnopt.muon_update_, ([p], [torch.randn(4, 6).bfloat16()], [], [m]),
                          dict(lr=0.01, weight_decay=0.1, lr_ratios=[1.0], l1=0.0), test_utils=utils)
