"""nnopt.optim.RAdam: torch.optim.RAdam's arguments and math, fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, _as_float, check_nonneg
from nnopt.optim._validate import check_betas, check_lr
from nnopt.reference.fused_optim import radam_scalars


class RAdam(FusedOptimizer):
    """Rectified Adam, as ``torch.optim.RAdam`` (``decoupled_weight_decay=True``: RAdamW).

    Extra arguments: ``backend=``, ``master_weights=``, ``l1=``. State per parameter, as in torch: ``step``,
    ``exp_avg``, ``exp_avg_sq``. The rectification branch (rho_t > 5) is taken per step, for all the
    parameters sharing a step count, in the kernel.
    """

    _op = "radam_step"
    _kernel_takes_step = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled_weight_decay=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, backend=None,
                 master_weights=False, l1=0.0):
        check_lr(lr)
        check_nonneg(eps, "epsilon value")
        check_betas(betas)
        check_nonneg(weight_decay, "weight_decay value")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1,
                         differentiable=differentiable, capturable=capturable)

    def _group_defaults(self):
        return dict(super()._group_defaults(), decoupled_weight_decay=False)

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("exp_avg", "exp_avg_sq")

    def _hyper(self, group, step, extra):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        bc1, bc2_sqrt, rect = radam_scalars(beta1, beta2, step)
        return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    decoupled=bool(group["decoupled_weight_decay"]), maximize=bool(group["maximize"]),
                    bias_correction1=bc1, bias_correction2_sqrt=bc2_sqrt, rect=rect)
