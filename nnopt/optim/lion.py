"""nnopt.optim.Lion: the sign-momentum optimizer of Chen et al. 2023 ("Symbolic Discovery of Optimization
Algorithms"), fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, _as_float, check_nonneg
from nnopt.optim._validate import check_betas, check_lr


class Lion(FusedOptimizer):
    """Lion, as in the paper (Algorithm 2) and optax/lucidrains' lion-pytorch: per element,
    ``p *= 1 - lr*wd;  p -= lr * sign(beta1*m + (1-beta1)*g);  m = beta2*m + (1-beta2)*g``.

    Defaults are the paper's: lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0 (decoupled, scaled by lr).
    Extra arguments: ``maximize=``, ``backend=``, ``master_weights=``, ``l1=``. State per parameter:
    ``exp_avg`` (no step count: the update does not use one).
    """

    _op = "lion_step"
    _has_step = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, backend=None,
                 master_weights=False, l1=0.0):
        check_lr(lr)
        check_betas(betas)
        check_nonneg(weight_decay, "weight_decay value")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1)

    def _init_state(self, p, group, state):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=self._state_dtype(p, group),
                                                memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("exp_avg",)

    def _hyper(self, group, step, extra):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        return dict(beta1=beta1, beta2=beta2, weight_decay=float(group["weight_decay"]),
                    maximize=bool(group["maximize"]))
