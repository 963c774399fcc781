"""nnopt.optim.Adafactor: torch.optim.Adafactor's arguments, math and state, with every per-tensor reduction
(||p||, the row and column second moments, ||update||) batched over the parameters of the same shape."""

import math

import torch

from nnopt import sparsity


class Adafactor(torch.optim.Optimizer):
    """Adafactor, as ``torch.optim.Adafactor``: factored second moments (``row_var`` [..., R, 1], ``col_var``
    [..., 1, C]) for parameters of 2 or more dimensions, a full ``variance`` otherwise; the step-dependent
    beta2 (``step**beta2_decay``) and relative step size (``min(lr, step**-0.5)`` times
    ``max(eps2, RMS(p))``); the update clipped to RMS ``d``; decoupled weight decay; maximize.

    Per step and group, the parameters with gradients are grouped by (shape, dtype, device, step count, mask):
    each group's statistics, update and norms are computed on the stacked tensors with a few batched ops, not a
    Python loop of ops per parameter. The per-tensor scalars stay tensors (no host read per parameter).
    Extra: masks (nnopt.sparsity; masked entries of the parameter, of the update and of ``variance`` are exactly
    0) and GradScaler (gradients unscaled; a step with an inf/NaN changes nothing). State per parameter, as torch:
    ``step`` (CPU float32), ``row_var``/``col_var`` or ``variance``: checkpoints move both ways.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
                 foreach=None, maximize=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item() != 0):  # one host read per step under GradScaler
            return loss
        for group in self.param_groups:
            batches = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Adafactor does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    if p.grad.dim() > 1:
                        state["row_var"] = p.grad.new_zeros(p.shape[:-1] + (1,))
                        state["col_var"] = p.grad.new_zeros(p.shape[:-2] + (1, p.shape[-1]))
                    else:
                        state["variance"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                key = (tuple(p.shape), p.dtype, p.device, float(state["step"]), sparsity.get_mask(p) is not None)
                batches.setdefault(key, []).append(p)
            for (shape, dtype, _, step, masked), ps in batches.items():
                self._step_batch(group, ps, shape, dtype, step + 1, masked, grad_scale)
        return loss

    def _step_batch(self, group, ps, shape, dtype, step, masked, grad_scale):
        lr = float(group["lr"])
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(dtype).eps
        states = [self.state[p] for p in ps]
        for st in states:
            st["step"] += 1
        one_minus_beta2 = step ** group["beta2_decay"]
        rho = min(lr, 1 / (step**0.5))
        numel = math.prod(shape)
        # RMS of each parameter before the decay: alpha_i = max(eps2, ||p_i|| / sqrt(numel)) * rho
        alpha = torch.stack(torch._foreach_norm(ps)).div_(numel**0.5).clamp_(min=eps2).mul_(rho)
        if group["weight_decay"] != 0:
            torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
        g = torch.stack([p.grad for p in ps])
        if grad_scale is not None:
            g = g / grad_scale.to(g.device, g.dtype)
        if group["maximize"]:
            g = g.neg_()
        masks = None
        if masked:
            masks = torch.stack([sparsity.get_mask(p) for p in ps])
            g = g.masked_fill_(~masks, 0)
        if len(shape) > 1:
            row_vars = [st["row_var"] for st in states]
            col_vars = [st["col_var"] for st in states]
            row = torch.stack(row_vars).lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(shape[-1]),
                                              one_minus_beta2)
            col = torch.stack(col_vars).lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(shape[-2]),
                                              one_minus_beta2)
            torch._foreach_copy_(row_vars, list(row.unbind(0)))
            torch._foreach_copy_(col_vars, list(col.unbind(0)))
            var = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            variances = [st["variance"] for st in states]
            var = torch.stack(variances).lerp_(g * g, one_minus_beta2)
            if masked:
                var.masked_fill_(~masks, 0)
            torch._foreach_copy_(variances, list(var.unbind(0)))
            var = var.clone()
        update = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)
        dims = tuple(range(1, update.dim()))
        norms = torch.linalg.vector_norm(update, dim=dims) if dims else update.abs()
        denom = (norms / ((numel**0.5) * group["d"])).clamp_(min=1.0)
        coef = (-alpha / denom).to(dtype).reshape((-1,) + (1,) * len(shape))
        torch._foreach_add_(ps, list((update * coef).unbind(0)))
        if masked:
            torch._foreach_mul_(ps, list(masks.unbind(0)))
