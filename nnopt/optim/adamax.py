"""nnopt.optim.Adamax: torch.optim.Adamax's arguments and math, fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, _as_float, check_nonneg
from nnopt.optim._validate import check_betas, check_lr


class Adamax(FusedOptimizer):
    """Adamax (Adam with the infinity norm), as ``torch.optim.Adamax``.

    Extra arguments: ``backend=``, ``master_weights=``, ``l1=``. State per parameter, as in torch: ``step``,
    ``exp_avg``, ``exp_inf``.
    """

    _op = "adamax_step"
    _kernel_takes_step = True

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, *,
                 maximize=False, differentiable=False, capturable=False, backend=None, master_weights=False, l1=0.0):
        check_lr(lr)
        check_nonneg(eps, "epsilon value")
        check_betas(betas)
        check_nonneg(weight_decay, "weight_decay value")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1,
                         differentiable=differentiable, capturable=capturable)

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_inf"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("exp_avg", "exp_inf")

    def _hyper(self, group, step, extra):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    maximize=bool(group["maximize"]), bias_correction1=1 - beta1**step)
