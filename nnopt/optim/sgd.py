"""nnopt.optim.SGD: torch.optim.SGD's arguments and math, fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, check_lr, check_nonneg
from nnopt.optim._quant_state import QuantStates


class SGD(QuantStates, FusedOptimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov, weight decay and maximize.

    Same constructor and update as ``torch.optim.SGD``, plus ``backend=`` (triton, cuda, cpu, torch, auto),
    ``master_weights=`` (fp32 master copies of bf16/fp16 parameters) and ``l1=`` (proximal L1 after the update).
    State per parameter: ``momentum_buffer`` (only when momentum != 0), as in torch.
    """

    _op = "sgd_step"
    _traceable = True
    _has_step = False
    _supports_sparse = True

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend=None,
                 master_weights=False, l1=0.0, **quant):
        check_lr(lr)
        check_nonneg(momentum, "momentum value")
        check_nonneg(weight_decay, "weight_decay value")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1,
                         differentiable=differentiable, **quant)

    def _group_defaults(self):
        return dict(super()._group_defaults(), nesterov=False)

    def _init_state(self, p, group, state):
        pass  # the momentum buffer is created by the first step that uses it, as in torch

    def _bucket_extra(self, group, state):
        return ("momentum_buffer" in state) if group["momentum"] != 0 else None

    def _prepare(self, group, params, has_buffer):
        if group["momentum"] != 0 and not has_buffer:
            for p in params:
                state = self.state[p]
                dtype = torch.float32 if "master_param" in state else p.dtype
                state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None,)

    def _hyper(self, group, step, has_buffer):
        return dict(momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    nesterov=bool(group["nesterov"]), weight_decay=float(group["weight_decay"]),
                    maximize=bool(group["maximize"]), first_step=not has_buffer)

    def _sparse_step(self, group, p, grad, state, lr):
        from torch.optim._functional import sgd

        buf = [state.get("momentum_buffer")]
        sgd([p], [grad], buf, has_sparse_grad=True, foreach=False, weight_decay=group["weight_decay"],
            momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"] != 0:
            state["momentum_buffer"] = buf[0]
