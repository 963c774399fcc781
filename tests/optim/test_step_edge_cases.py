"""Edge cases of the step that torch's suite found: complex Adagrad accumulators, parameters without gradients
(meta included), parameters on devices nnopt has no kernel for, duplicate parameters, torch's argument checks."""

import pytest
import torch

import nnopt.optim as nno
from nnopt.testing import assert_close
from tests.conftest import skip_unless_available

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_adagrad_complex_initial_accumulator(backend):
    """torch starts a complex parameter's sum at complex(v, v); the kernels run on the real view."""
    skip_unless_available(backend, "cpu")
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64))
    q = torch.nn.Parameter(p.detach().clone())
    kw = dict(lr=0.1, initial_accumulator_value=0.3, weight_decay=0.1)
    ours, theirs = nno.Adagrad([p], backend=backend, **kw), torch.optim.Adagrad([q], foreach=False, **kw)
    assert_close(ours.state[p]["sum"], theirs.state[q]["sum"])
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert_close(torch.view_as_real(p.detach()), torch.view_as_real(q.detach()))
    assert_close(torch.view_as_real(ours.state[p]["sum"]), torch.view_as_real(theirs.state[q]["sum"]))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_params_without_grads_cost_nothing(name):
    """A model still on the meta device (built before materialisation): parameters without gradients are never
    touched, whatever their device; no state appears for them, and the step launches nothing."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    cpu = torch.nn.Parameter(torch.randn(3))
    opt = getattr(nno, name)([{"params": list(model.parameters())}, {"params": [cpu]}], lr=0.1)
    before = {p: dict(opt.state[p]) if p in opt.state else None for p in model.parameters()}
    opt.step()  # nothing has a gradient
    cpu.grad = torch.randn(3)
    ref = cpu.detach().clone()
    opt.step()  # only the CPU parameter moves
    assert not torch.equal(cpu.detach(), ref)
    for p in model.parameters():
        assert p.device.type == "meta"
        after = dict(opt.state[p]) if p in opt.state else None
        assert (after is None) == (before[p] is None)  # Adagrad creates state at construction, as torch does
    assert all(p.device.type == "cpu" for plan in opt._plans.values() for b in plan.buckets
               for p in b.lists["params"])


def test_meta_param_with_grad_names_it():
    with torch.device("meta"):
        w = torch.nn.Parameter(torch.randn(3, 2))
        w.grad = torch.randn(3, 2)
    opt = nno.AdamW([w])
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 is on meta"):
        opt.step()


def test_duplicate_parameters_warn_as_torch_and_refuse_to_step():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = nno.SGD([p, p], lr=0.1)
    p.grad = torch.ones(3)
    ref = p.detach().clone()
    with pytest.raises(ValueError, match="param group 0 holds the same parameter twice"):
        opt.step()
    assert torch.equal(p.detach(), ref)


@pytest.mark.parametrize("kwargs,match", [
    (dict(betas=(0.9, torch.tensor(0.99))), "betas must be either both floats or both Tensors"),
    (dict(betas=(torch.tensor(0.9), 0.99)), "betas must be either both floats or both Tensors"),
    (dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True), r"betas\[0\] as a Tensor is not supported"),
    (dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.99))), "Invalid beta parameter at index 0"),
    (dict(lr=torch.tensor(1e-3), foreach=True), "lr as a Tensor is not supported for capturable=False"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(lr=-1.0), "Invalid learning rate"),
])
def test_adam_arguments_fail_as_torch(kwargs, match):
    p = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match=match):
        nno.Adam(p, **kwargs)


def test_tensor_betas_match_torch():
    kw = dict(lr=0.01, betas=(torch.tensor(0.8), torch.tensor(0.9)))
    p = torch.nn.Parameter(torch.randn(6))
    q = torch.nn.Parameter(p.detach().clone())
    ours, theirs = nno.Adam([p], **kw), torch.optim.Adam([q], foreach=False, **kw)
    for _ in range(3):
        p.grad = torch.randn(6)
        q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    assert_close(p.detach(), q.detach())
