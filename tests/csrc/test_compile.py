"""The registered ops trace under torch.compile (fullgraph, through the fake kernels and functionalization)."""

import torch

from tests.conftest import skip_unless_available


def _sgd(ps, gs, bufs):
    torch.ops.nnopt.sgd_step_(ps, gs, bufs, [], [], lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
                              weight_decay=0.0, maximize=False, l1=0.0, first_step=False)
    return ps[0].sum()


def test_sgd_step_under_torch_compile():
    skip_unless_available("cpu", "cpu")
    ps, gs, bufs = ([torch.randn(5), torch.randn(3)] for _ in range(3))
    ps2, bufs2 = [p.clone() for p in ps], [b.clone() for b in bufs]
    eager = _sgd(ps2, gs, bufs2)
    compiled = torch.compile(_sgd, backend="aot_eager", fullgraph=True)(ps, gs, bufs)
    assert torch.equal(compiled, eager)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))
    assert all(torch.equal(a, b) for a, b in zip(bufs, bufs2))
