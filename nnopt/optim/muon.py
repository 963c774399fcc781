"""nnopt.optim.Muon: torch.optim.Muon's arguments, math and state, with the Newton–Schulz orthogonalisation batched
over every parameter of the same shape (one bf16 batched matmul chain per shape group, not one per matrix)."""

import math

import torch

from nnopt import sparsity

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch.optim.Muon's learning-rate adjustment for a matrix of ``shape`` (A, B)."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, a / b))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(a, b))
    else:
        ratio = 1.0
    return lr * ratio


def newton_schulz(updates, coefficients, steps, eps):
    """Orthogonalises a batch of equal-shaped matrices [n, A, B] as torch.optim.Muon does each one: bf16, the wide
    orientation, X / max(||X||_F, eps), then ``steps`` quintic iterations X <- aX + (bA + cA²)X with A = XXᵀ.
    Returns bf16 [n, A, B]: torch's result bit for bit for n == 1; for n > 1, to the last bf16 bit (see below)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    # A lone matrix runs torch's own 2-D kernels: bf16 baddbmm rounds its epilogue differently from addmm in the
    # last bit now and then (about 1 op in 3000), so only the 2-D path is bit-identical to torch.
    single = updates.size(0) == 1
    addmm = torch.addmm if single else torch.baddbmm
    x = updates[0].bfloat16() if single else updates.bfloat16()
    tall = updates.size(-2) > updates.size(-1)
    if tall:
        x = x.mT
    norms = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / norms.clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = addmm(gram, gram, gram, beta=b, alpha=c)
        x = addmm(x, poly, x, beta=a)
    x = x.mT if tall else x
    return x.unsqueeze(0) if single else x


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalised by Newton–Schulz), as ``torch.optim.Muon``: 2-D parameters only;
    ``buf.lerp_(g, 1 - momentum)``; ``update = g.lerp(buf, momentum)`` (nesterov) or ``buf``; NS in bf16;
    ``p *= 1 - lr*wd``; ``p -= adjusted_lr * NS(update)``. State per parameter: ``momentum_buffer``.

    Per step and group, the parameters with gradients are grouped by (shape, dtype, device, mask presence): each
    group's momentum update and Newton–Schulz chain run batched over its matrices (a transformer's dozens of equal
    matrices cost a few launches, not dozens). Extra: masks (nnopt.sparsity; masked entries stay exactly 0 in the
    parameter and the buffer) and GradScaler (gradients unscaled; a step with an inf/NaN changes nothing; a found_inf
    on a GPU is never read on the host: the step's changes are scaled by 0 instead).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.device.type == "cpu":
            if bool(found_inf.item() != 0):  # a CPU flag costs nothing to read
                return loss
            found_inf = None
        for group in self.param_groups:
            shape_groups = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                key = (tuple(p.shape), p.dtype, p.device, sparsity.get_mask(p) is not None)
                shape_groups.setdefault(key, []).append(p)
            for (shape, _, _, masked), ps in shape_groups.items():
                self._step_group(group, ps, shape, masked, grad_scale, found_inf)
        return loss

    def _step_group(self, group, ps, shape, masked, grad_scale, found_inf=None):
        lr = float(group["lr"])
        momentum = group["momentum"]
        grads = [p.grad for p in ps]
        if grad_scale is not None or masked:
            masks = [sparsity.get_mask(p) for p in ps] if masked else None
            grads = [g / grad_scale.to(g.device, g.dtype) if grad_scale is not None else g for g in grads]
            if masked:
                grads = [g.masked_fill(~m, 0) for g, m in zip(grads, masks)]
        bufs = []
        for p in ps:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        keep = None
        if found_inf is not None:  # a device flag is never read on the host: a skipped step scales every change by 0
            keep = (found_inf.to(ps[0].device).reshape(()) == 0).to(torch.float32)
            for buf, g in zip(bufs, grads):
                buf.lerp_(g, (1 - momentum) * keep)
        else:
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
        # The batch of updates is written in place (no stacking copy): g.lerp(buf, momentum) or buf.
        update = torch.empty((len(ps),) + shape, dtype=grads[0].dtype, device=grads[0].device)
        for u, g, buf in zip(update, grads, bufs):
            if group["nesterov"]:
                torch.lerp(g, buf, momentum, out=u)
            else:
                u.copy_(buf)
        ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        decay, alpha = 1 - lr * group["weight_decay"], -adjusted_lr(lr, group["adjust_lr_fn"], shape)
        if keep is not None:
            decay_t, alpha_t = 1 - (1 - decay) * keep, alpha * keep
            for p, o in zip(ps, ortho):
                p.mul_(decay_t).addcmul_(o, alpha_t)
        else:
            for p, o in zip(ps, ortho):
                p.mul_(decay).add_(o, alpha=alpha)  # the bf16 update promoted on the fly, as torch's param.add_
        if masked:
            torch._foreach_mul_(ps, masks)
            torch._foreach_mul_(bufs, masks)
