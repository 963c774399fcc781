"""nnopt.optim.Adam and AdamW: torch.optim's arguments and math, fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, _as_float, bias_corrections, check_betas, check_lr, check_nonneg
from nnopt.optim._quant_state import QuantStates


class Adam(QuantStates, FusedOptimizer):
    """Adam (and, with ``decoupled_weight_decay=True``, AdamW), as ``torch.optim.Adam``.

    Extra arguments: ``backend=``, ``master_weights=`` (fp32 master copies of bf16/fp16 parameters; states
    are then fp32) and ``l1=`` (proximal L1 after the update). State per parameter, as in torch: ``step``
    (CPU float32 tensor), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad); plus ``master_param``.
    """

    _op = "adam_step"
    _traceable = True
    _kernel_takes_step = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, master_weights=False, l1=0.0, **quant):
        check_lr(lr, foreach, capturable, tensor_with_foreach=False)
        check_nonneg(eps, "epsilon value")
        check_nonneg(weight_decay, "weight_decay value")
        check_betas(betas, foreach, capturable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1,
                         differentiable=differentiable, capturable=capturable, **quant)

    def _group_defaults(self):
        return dict(super()._group_defaults(), amsgrad=False, decoupled_weight_decay=False)

    def _init_state(self, p, group, state):
        dtype = self._state_dtype(p, group)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def _hyper(self, group, step, extra):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, step)
        return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    decoupled=bool(group["decoupled_weight_decay"]), amsgrad=bool(group["amsgrad"]),
                    maximize=bool(group["maximize"]), bias_correction1=bc1, bias_correction2_sqrt=bc2_sqrt)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (default 1e-2), as ``torch.optim.AdamW``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, backend=None,
                 master_weights=False, l1=0.0, **quant):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, master_weights=master_weights, l1=l1,
                         **quant)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch.optim.AdamW: always decoupled
