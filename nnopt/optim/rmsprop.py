"""nnopt.optim.RMSprop: torch.optim.RMSprop's arguments and math, fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, check_lr, check_nonneg
from nnopt.optim._quant_state import QuantStates


class RMSprop(QuantStates, FusedOptimizer):
    """RMSprop with alpha, eps, weight decay, momentum, centered and maximize, as ``torch.optim.RMSprop``.

    Extra arguments: ``backend=``, ``master_weights=``, ``l1=``. State per parameter, as in torch: ``step``,
    ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).
    """

    _op = "rmsprop_step"
    _traceable = True

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, backend=None,
                 master_weights=False, l1=0.0, **quant):
        check_lr(lr)
        check_nonneg(eps, "epsilon value")
        check_nonneg(momentum, "momentum value")
        check_nonneg(weight_decay, "weight_decay value")
        check_nonneg(alpha, "alpha value")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1,
                         differentiable=differentiable, capturable=capturable, **quant)

    def _group_defaults(self):
        return dict(super()._group_defaults(), momentum=0, centered=False)

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in [k for k in self._state_lists(group) if k is not None]:
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("square_avg", "momentum_buffer" if group["momentum"] > 0 else None,
                "grad_avg" if group["centered"] else None)

    def _hyper(self, group, step, extra):
        return dict(alpha=float(group["alpha"]), eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    momentum=float(group["momentum"]), centered=bool(group["centered"]),
                    maximize=bool(group["maximize"]))
