"""torch.compile around ``opt.step()``: one trace, no graph break (fullgraph=True), the eager step's results.

Traces are counted with dynamo's CompileCounter over the aot_eager backend (AOT autograd functionalises the
kernels' in-place op through its fake kernel, as inductor would; without inductor's C++ compile time).
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import nnopt.optim as nno
from nnopt.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    ("AdamW", dict(lr=0.01), 1),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True), 1),
    ("Adagrad", dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1), 1),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True), 1),
    ("SGD", dict(lr=0.1, weight_decay=0.1), 1),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), 2),  # the first step creates the momentum buffers
]


def _params():
    """A scalar, odd sizes, a transposed (dense) view, a strided view, and one left without a gradient. (Complex
    parameters take the eager path under compile.)"""
    ps = [torch.randn(()), torch.randn(17), torch.randn(5, 13), torch.randn(9, 4).t(), torch.randn(6, 10)[:, ::3],
          torch.randn(4)]
    return [torch.nn.Parameter(p) for p in ps]


@pytest.mark.parametrize("name,kwargs,graphs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_compiled_step_traces_once_and_matches_eager(name, kwargs, graphs):
    torch._dynamo.reset()
    ps = _params()
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    cls = getattr(nno, name)
    compiled_opt, eager_opt = cls(ps, **kwargs), cls(qs, **kwargs)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step():
        compiled_opt.step()

    for _ in range(6):
        for j, (p, q) in enumerate(zip(ps, qs)):
            g = None if j == len(ps) - 1 else torch.randn_like(p)
            p.grad, q.grad = g, None if g is None else g.clone()
        step()
        eager_opt.step()
    frames = counter.frame_count
    for p, q in zip(ps, qs):
        assert_close(torch.view_as_real(p.detach()) if p.is_complex() else p.detach(),
                     torch.view_as_real(q.detach()) if q.is_complex() else q.detach())
        assert set(compiled_opt.state.get(p, {})) == set(eager_opt.state.get(q, {}))
        for k, v in eager_opt.state.get(q, {}).items():
            got = compiled_opt.state[p][k]
            assert_close(torch.view_as_real(got) if got.is_complex() else got,
                         torch.view_as_real(v) if v.is_complex() else v, msg=k)
    assert frames == graphs


def test_compiled_step_then_eager_and_checkpoint():
    """State written by the compiled step is the eager step's: eager steps and torch.optim checkpoints follow."""
    torch._dynamo.reset()
    ps = [torch.nn.Parameter(torch.randn(8, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = nno.AdamW(ps, lr=0.01)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        step()
    assert float(opt.state[ps[0]]["step"]) == 3.0
    twin = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=0.01, foreach=False)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch's loader would share the step tensors)
    for p, q in zip(ps, twin.param_groups[0]["params"]):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(ps, twin.param_groups[0]["params"]):
        assert_close(p.detach(), q.detach())


def test_tensor_lr_changes_without_retrace():
    """A tensor lr updated in place (a scheduler's way under compile) is read by the kernel: one trace. (A float lr
    is a constant of the graph, as in torch's compiled optimizers: changing it retraces.)"""
    torch._dynamo.reset()
    ps = [torch.nn.Parameter(torch.randn(8, 3))]
    qs = [torch.nn.Parameter(ps[0].detach().clone())]
    opt, ref = nno.AdamW(ps, lr=torch.tensor(0.01)), nno.AdamW(qs, lr=torch.tensor(0.01))
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step():
        opt.step()

    for _ in range(4):
        ps[0].grad = torch.randn_like(ps[0])
        qs[0].grad = ps[0].grad.clone()
        step()
        ref.step()
        for o in (opt, ref):
            o.param_groups[0]["lr"].mul_(0.5)
    assert counter.frame_count == 1
    assert_close(ps[0].detach(), qs[0].detach())


def test_compiled_step_skips_on_found_inf():
    """GradScaler's found_inf under compile: read by the kernels, subtracted from the counts; no host read."""
    torch._dynamo.reset()
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    before = [p.detach().clone() for p in ps]
    opt = nno.Adam(ps, lr=0.1)
    step = torch.compile(lambda: opt.step(), backend="aot_eager", fullgraph=True)
    opt.grad_scale, opt.found_inf = torch.full((1,), 4.0), torch.ones(())
    for p in ps:
        p.grad = torch.randn_like(p)
    step()
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
        assert float(opt.state[p]["step"]) == 0.0 and not opt.state[p]["exp_avg"].any()
    opt.found_inf = torch.zeros(())
    step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert float(opt.state[ps[0]]["step"]) == 1.0
