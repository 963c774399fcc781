"""nnopt.optim.Muon: torch.optim.Muon's arguments, math and state: fused momentum and parameter steps (the
``muon_momentum``/``muon_update`` ops of the fused_optim family) around the Newton–Schulz orthogonalisation, batched
over every parameter of the same shape (one bf16 batched matmul chain per shape group, not one per matrix)."""

import math

import torch

from nnopt import backends, sparsity
from nnopt.optim._fused import FAMILY, check_nonneg

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


def _host_flag(flag):
    """Whether GradScaler's found_inf is read on the host (a CPU tensor: free) rather than by the kernels."""
    return flag.device.type == "cpu"


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalised by Newton–Schulz), as ``torch.optim.Muon``: 2-D parameters only;
    ``buf.lerp_(g, 1 - momentum)``; ``update = g.lerp(buf, momentum)`` (nesterov) or ``buf``; NS in bf16;
    ``p *= 1 - lr*wd``; ``p -= adjusted_lr * NS(update)``. State per parameter: ``momentum_buffer``.

    Per step and group, two fused kernel calls (``backend=``: cpu, cuda, triton or torch) cover every parameter of
    a device and dtype: the momentum step, which writes the bf16 updates straight into one batch per shape, and
    the parameter step (weight decay, each matrix's adjusted lr, masks, L1, masters). Between them the Newton–Schulz
    chain runs batched per shape (torch's bf16 matmuls: a transformer's dozens of equal matrices cost a few
    launches). Extra: ``backend=``, ``master_weights=`` (bf16/fp16 parameters with fp32 masters and fp32 buffers),
    ``l1=``; masks (nnopt.sparsity: masked entries of the parameter and the buffer exactly 0); GradScaler
    (gradients unscaled in-kernel; a step with an inf/NaN changes nothing; a found_inf on a GPU is read by the
    kernels only, never on the host).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None, *, backend=None,
                 master_weights=False, l1=0.0):
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
        check_nonneg(l1, "l1 value")
        if backend is not None and backend not in backends.CHOICES:
            raise ValueError(f"Muon: unknown backend {backend!r}; choose one of {', '.join(backends.CHOICES)}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        backend=backend, master_weights=bool(master_weights), l1=l1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("backend", None)
            group.setdefault("master_weights", False)
            group.setdefault("l1", 0.0)

    @torch.no_grad()
    def sync_master_weights(self):
        """Copies each parameter into its fp32 master (after writing to a bf16/fp16 parameter outside the step)."""
        for p, st in self.state.items():
            if "master_param" in st:
                st["master_param"].copy_(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and _host_flag(found_inf):
            if bool(found_inf.item() != 0):  # a CPU flag costs nothing to read
                return loss
            found_inf = None
        buckets = []
        for group in self.param_groups:  # validate everything before changing anything
            batches = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                master = group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16)
                key = (p.device, p.dtype, sparsity.get_mask(p) is not None, master)
                batches.setdefault(key, []).append(p)
            buckets += [(group, key, ps) for key, ps in batches.items()]
        for group, (device, _, masked, master), ps in buckets:
            self._step_bucket(group, device, ps, masked, master, grad_scale, found_inf)
        return loss

    def _state(self, p, master):
        state = self.state[p]
        dtype = torch.float32 if master else p.dtype
        buf = state.get("momentum_buffer")
        if buf is None or not buf.is_contiguous() or buf.dtype != dtype:
            state["momentum_buffer"] = (torch.zeros(p.shape, dtype=dtype, device=p.device) if buf is None
                                        else buf.to(dtype).contiguous())
        if master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32).contiguous()
        return state

    def _step_bucket(self, group, device, ps, masked, master, grad_scale, found_inf):
        impl = backends.implementation(FAMILY, backends.resolve(FAMILY, backends.requested(group["backend"]), device))
        states = [self._state(p, master) for p in ps]
        bufs = [st["momentum_buffer"] for st in states]
        masks = [sparsity.get_mask(p) for p in ps] if masked else []
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in ps]
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        shapes = {}
        for j, p in enumerate(ps):
            shapes.setdefault(tuple(p.shape), []).append(j)
        # The updates go straight into one bf16 batch per shape (Newton–Schulz's input dtype: torch casts there).
        batches = {s: torch.empty((len(js),) + s, dtype=torch.bfloat16, device=device) for s, js in shapes.items()}
        updates = [None] * len(ps)
        for s, js in shapes.items():
            for k, j in enumerate(js):
                updates[j] = batches[s][k]
        impl.muon_momentum(grads, bufs, updates, masks, momentum=float(group["momentum"]),
                           nesterov=bool(group["nesterov"]), grad_scale=grad_scale, found_inf=found_inf)
        orthos = [None] * len(ps)
        for s, js in shapes.items():
            # (a tall shape comes back transposed: the kernels take contiguous bf16, a small copy)
            ortho = newton_schulz(batches[s], group["ns_coefficients"], group["ns_steps"], group["eps"]).contiguous()
            for k, j in enumerate(js):
                orthos[j] = ortho[k]
        lr = group["lr"]
        lr_tensor = None
        if isinstance(lr, torch.Tensor):
            lr, lr_tensor = (float(lr), None) if lr.device.type == "cpu" else (0.0, lr.detach().reshape(1).to(device))
        ratios = [adjusted_lr(1.0, group["adjust_lr_fn"], p.shape) for p in ps]
        targets = [p if p.is_contiguous() else p.contiguous() for p in ps]
        impl.muon_update(targets, orthos, [st["master_param"] for st in states] if master else [], masks, lr=float(lr),
                         weight_decay=float(group["weight_decay"]), lr_ratios=ratios, l1=float(group["l1"]),
                         lr_tensor=lr_tensor, found_inf=found_inf)
        for p, t in zip(ps, targets):
            if t is not p:
                p.copy_(t)
