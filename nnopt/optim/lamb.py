"""nnopt.optim.LAMB: layer-wise adaptive moments (You et al. 2020) as apex's FusedLAMB, in two launches per group."""

import torch

from nnopt import backends
from nnopt.optim._fused import FAMILY, FusedOptimizer, _as_float, check_nonneg
from nnopt.optim._validate import check_betas, check_lr


class LAMB(FusedOptimizer):
    """LAMB with apex FusedLAMB's arguments, defaults and semantics.

    Per step: the global gradient norm over every parameter of the optimizer (one reduction launch per device;
    the gradients are divided by norm / max_grad_norm when that exceeds 1, max_grad_norm > 0); then per group one
    call whose first pass updates the moments and reduces each tensor's ||p|| and ||u|| (u: the Adam direction,
    + weight_decay * p in adam_w_mode) for all tensors at once, and whose second pass applies
    p -= lr * ||p||/||u|| * u (plain lr when either norm is 0, or when weight_decay == 0 and not use_nvlamb).

    Extra arguments: ``maximize=``, ``backend=``, ``master_weights=``, ``l1=``. State per parameter: ``step``,
    ``exp_avg``, ``exp_avg_sq`` (torch.optim's names). GradScaler: the step is skipped in-kernel on inf/NaN and
    the clip factor uses the unscaled norm, with no host synchronisation.
    """

    _op = "lamb_step"
    _kernel_takes_step = True

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False, *,
                 maximize=False, backend=None, master_weights=False, l1=0.0):
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        check_lr(lr)
        check_nonneg(eps, "epsilon value")
        check_betas(betas)
        check_nonneg(weight_decay, "weight_decay value")
        check_nonneg(max_grad_norm, "max_grad_norm value")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        adam_w_mode=adam_w_mode, grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
                        use_nvlamb=use_nvlamb, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1)
        self._grad_norms = {}

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("exp_avg", "exp_avg_sq")

    def _bucket_extra(self, group, state):
        return state["exp_avg"].device  # picks the global gradient norm computed on this device

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._grad_norms = self._global_grad_norms()
        super().step()
        self._grad_norms = {}
        return loss

    def _global_grad_norms(self):
        """{device: ||all gradients||} (the scaled gradients under GradScaler), a one-element tensor per device
        holding parameters, from one l2_norms call per device; {} when no group clips."""
        if not any(g["max_grad_norm"] > 0 for g in self.param_groups):
            return {}
        by_device = {}
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None or g.is_sparse:
                    continue
                g = torch.view_as_real(g) if g.is_complex() else g
                by_device.setdefault(g.device, []).append(g if g.is_contiguous() else g.contiguous())
        squares = []
        for device, grads in by_device.items():
            backend = backends.resolve(FAMILY, self.param_groups[0]["backend"], device)
            norms = backends.implementation(FAMILY, backend).l2_norms(grads)  # (cuda: two launches, no host read)
            squares.append(norms.to(torch.float64).square().sum())
        if not squares:
            return {}
        first = squares[0].device
        total = torch.stack([s.to(first, non_blocking=True) for s in squares]).sum().sqrt().reshape(1)
        return {d: total if d == first else total.to(d, non_blocking=True) for d in by_device}

    def _hyper(self, group, step, device):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        bc = bool(group["bias_correction"])
        return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    adam_w_mode=bool(group["adam_w_mode"]), grad_averaging=bool(group["grad_averaging"]),
                    use_nvlamb=bool(group["use_nvlamb"]), bias_correction=bc,
                    max_grad_norm=float(group["max_grad_norm"]), maximize=bool(group["maximize"]),
                    bias_correction1=1 - beta1**step if bc else 1.0, bias_correction2=1 - beta2**step if bc else 1.0,
                    grad_norm=self._grad_norms.get(device) if group["max_grad_norm"] > 0 else None)
