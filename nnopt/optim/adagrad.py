"""nnopt.optim.Adagrad: torch.optim.Adagrad's arguments and math, fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, check_lr, check_nonneg
from nnopt.optim._quant_state import QuantStates


class Adagrad(QuantStates, FusedOptimizer):
    """Adagrad with lr_decay, weight decay, initial accumulator value and maximize, as ``torch.optim.Adagrad``.

    Extra arguments: ``backend=``, ``master_weights=``, ``l1=``. State per parameter: ``step``, ``sum``.
    """

    _op = "adagrad_step"
    _traceable = True
    _kernel_takes_step = True
    _supports_sparse = True

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, backend=None,
                 master_weights=False, l1=0.0, **quant):
        check_lr(lr)
        check_nonneg(lr_decay, "lr_decay value")
        check_nonneg(weight_decay, "weight_decay value")
        check_nonneg(initial_accumulator_value, "initial_accumulator_value value")
        check_nonneg(eps, "epsilon value")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1,
                         differentiable=differentiable, **quant)
        for group in self.param_groups:  # as torch.optim.Adagrad: state from the start, for every parameter
            for p in group["params"]:
                self._init_state(p, group, self.state[p])

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if "sum" not in state:
            v = group["initial_accumulator_value"]
            # torch fills a complex sum with complex(v, v): v in both the real and the imaginary part
            state["sum"] = torch.full_like(p, complex(v, v) if p.is_complex() else v, dtype=self._state_dtype(p, group),
                                           memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("sum",)

    def _hyper(self, group, step, extra):
        return dict(weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                    maximize=bool(group["maximize"]), lr_decay_denom=1 + (step - 1) * float(group["lr_decay"]),
                    lr_decay=float(group["lr_decay"]))

    def _sparse_step(self, group, p, grad, state, lr):
        from torch.optim._functional import adagrad

        adagrad([p], [grad], [state["sum"]], [state["step"]], has_sparse_grad=True, foreach=False,
                lr=group["lr"], weight_decay=group["weight_decay"], lr_decay=group["lr_decay"], eps=group["eps"],
                maximize=group["maximize"])
