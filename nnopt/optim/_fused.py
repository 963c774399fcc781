"""FusedOptimizer: what every nnopt optimizer shares — state, validation, grouping and dispatch to a backend.

A subclass names its kernel (``_op``), creates its per-parameter state (``_init_state``), lists the state
tensors the kernel updates (``_state_lists``) and turns a group's hyperparameters into the kernel's keyword
arguments (``_hyper``). Everything else is here, once:

- state keys and layout are torch.optim's (``step`` is a CPU float32 tensor, as in torch's default path), so
  checkpoints move both ways between torch.optim and nnopt.optim;
- ``step()`` groups the parameters that have gradients by (device, dtype, step count, mask, master copy) and
  makes one backend call per group: O(1) kernel launches however many tensors;
- complex parameters run on their real view (as torch does); non-contiguous tensors run on contiguous copies
  that are written back; sparse gradients follow torch's own path where torch accepts them;
- GradScaler: ``grad_scale`` and ``found_inf`` (set on the optimizer by ``GradScaler.step``) go into the kernels,
  which unscale the gradients; a step with a non-finite gradient changes no parameter and no state.
"""

import math

import torch

from nnopt import backends, sparsity

FAMILY = "fused_optim"


def check_nonneg(value, what):
    """torch.optim's validation: ``what`` must be a non-negative number (or one-element tensor)."""
    v = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v >= 0.0):
        raise ValueError(f"Invalid {what}: {value}")


def _as_float(value):
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _needs_copy(t):
    return not t.is_contiguous()


class FusedOptimizer(torch.optim.Optimizer):
    """Base class; see the subclasses in nnopt.optim for the constructor arguments."""

    _step_supports_amp_scaling = True
    _op = None  # the kernel's name in the fused_optim family
    _has_step = True  # whether state["step"] exists (all but SGD)

    def __init__(self, params, defaults, *, backend=None, master_weights=False, l1=0.0, differentiable=False,
                 capturable=False):
        name = type(self).__name__
        check_nonneg(l1, "l1 value")
        if backend is not None and backend not in backends.CHOICES:
            raise ValueError(f"{name}: unknown backend {backend!r}; choose one of {', '.join(backends.CHOICES)}")
        if differentiable:
            raise ValueError(f"{name}: differentiable=True is not supported by nnopt's fused kernels")
        if capturable:
            raise ValueError(f"{name}: capturable=True is not supported (nnopt keeps step counts on the host)")
        defaults = dict(defaults, l1=l1, master_weights=bool(master_weights), backend=backend,
                        foreach=None, fused=None, capturable=False, differentiable=False)
        super().__init__(params, defaults)

    # -- torch.optim.Optimizer hooks -----------------------------------------------------------------------

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        for i, p in enumerate(group["params"]):
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"{type(self).__name__}: parameter {i} of param group {gi} has dtype {p.dtype}; "
                                "only floating-point and complex parameters can be optimized")
        if group.get("backend") not in backends.CHOICES + (None,):
            raise ValueError(f"{type(self).__name__}: unknown backend {group['backend']!r} in param group {gi}")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._group_defaults().items():
                group.setdefault(key, value)

    def _group_defaults(self):
        return dict(l1=0.0, master_weights=False, backend=None, maximize=False, foreach=None, fused=None,
                    capturable=False, differentiable=False)

    def load_state_dict(self, state_dict):
        """Loads a checkpoint of this optimizer or of its torch.optim twin (and keeps fp32 masters in fp32)."""
        saved = {}
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            s = state_dict["state"].get(pid)
            if s is not None:
                saved[p] = {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            fp32 = group["master_weights"]
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if "step" in st and isinstance(st["step"], torch.Tensor):
                    st["step"] = st["step"].detach().to("cpu", torch.float32)
                if fp32 and p.dtype in (torch.float16, torch.bfloat16):
                    # torch's loader casts every state to the parameter's dtype: restore fp32 from the checkpoint.
                    for k, v in saved.get(p, {}).items():
                        if k != "step" and v.is_floating_point():
                            st[k] = v.detach().to(device=p.device, dtype=torch.float32).clone()

    # -- what a subclass provides ----------------------------------------------------------------------

    def _init_state(self, p, group, state):
        raise NotImplementedError

    def _state_lists(self, group):
        """Names of the state tensors the kernel takes, in its argument order (None for an empty list)."""
        raise NotImplementedError

    def _hyper(self, group, step, extra):
        """The kernel's keyword arguments besides lr, l1, lr_tensor, grad_scale and found_inf."""
        raise NotImplementedError

    def _sparse_step(self, group, p, grad, state, lr):
        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    # -- the step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Validate every group before updating any, so a bad input leaves nothing half-updated.
        collected = [self._collect(gi, group) for gi, group in enumerate(self.param_groups)]
        if found_inf is not None and self._has_step and bool(found_inf.item() != 0):
            # Step counts live on the host (torch's default layout), so a skipped step reads found_inf once.
            return loss
        for gi, (group, (ps, gs)) in enumerate(zip(self.param_groups, collected)):
            self._step_group(gi, group, ps, gs, grad_scale, found_inf)
        return loss

    def _lr(self, group, device):
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device.type == "cpu":
                return float(lr), None
            return 0.0, lr.detach().reshape(1).to(device=device, dtype=torch.float32)
        return float(lr), None

    def _collect(self, gi, group):
        """Validates the group's parameters that have gradients; returns them with their grads."""
        name = type(self).__name__
        ps, gs = [], []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.device != p.device:
                raise ValueError(f"{name}: parameter {i} of param group {gi} is on {p.device} "
                                 f"but its gradient is on {g.device}")
            if g.dtype != p.dtype and not g.is_sparse:
                raise TypeError(f"{name}: parameter {i} of param group {gi} has dtype {p.dtype} "
                                f"but its gradient has dtype {g.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{name}: parameter {i} of param group {gi} has shape {tuple(p.shape)} "
                                 f"but its gradient has shape {tuple(g.shape)}")
            ps.append(p)
            gs.append(g)
        return ps, gs

    def _step_group(self, gi, group, ps, gs, grad_scale, found_inf):
        if not ps:
            return
        name = type(self).__name__
        master = group["master_weights"]
        dense = []
        for i, (p, g) in enumerate(zip(ps, gs)):
            state = self.state[p]
            if len(state) == 0 or (self._has_step and "step" not in state):
                self._init_state(p, group, state)
            if master and p.dtype in (torch.float16, torch.bfloat16) and "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
            if g.is_sparse:
                if sparsity.get_mask(p) is not None or group["l1"] != 0 or grad_scale is not None:
                    raise RuntimeError(f"{name}: parameter {i} of param group {gi} has a sparse gradient; "
                                       "masks, l1 and GradScaler need dense gradients")
                self._sparse_step(group, p, g, state, self._lr(group, p.device))
                continue
            dense.append((p, g, state))
        if not dense:
            return
        if self._has_step:
            steps = [s["step"] for _, _, s in dense]
            torch._foreach_add_(steps, 1)
            step_values = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
        else:
            step_values = [0.0] * len(dense)
        buckets = {}
        for (p, g, state), sv in zip(dense, step_values):
            mask = sparsity.get_mask(p)
            key = (p.device, p.dtype, sv, mask is not None, "master_param" in state, self._bucket_extra(state))
            buckets.setdefault(key, []).append((p, g, state, mask))
        for (device, dtype, sv, masked, has_master, extra), items in buckets.items():
            self._launch(group, device, sv, extra, items, masked, has_master, grad_scale, found_inf)

    def _bucket_extra(self, state):
        """Anything else that must be uniform within one kernel call (SGD: whether the buffer exists yet)."""
        return None

    def _prepare(self, group, items, extra):
        """Creates any state the kernel needs before this call (SGD: momentum buffers on the first step)."""

    def _launch(self, group, device, step, extra, items, masked, has_master, grad_scale, found_inf):
        self._prepare(group, items, extra)
        names = self._state_lists(group)
        if items[0][0].is_complex():
            if masked:
                raise TypeError(f"{type(self).__name__}: complex parameters cannot carry a mask")
            if group["l1"] != 0:
                raise ValueError(f"{type(self).__name__}: l1 is not defined for complex parameters")
            view = torch.view_as_real
        else:
            def view(t):
                return t
        lists = {"params": [], "grads": [], "masters": [], "masks": []}
        for n in names:
            if n is not None:
                lists[n] = []
        for p, g, state, mask in items:
            lists["params"].append(view(p))
            lists["grads"].append(view(g))
            for n in names:
                if n is not None:
                    lists[n].append(view(state[n]))
            if has_master:
                lists["masters"].append(state["master_param"])
            if masked:
                lists["masks"].append(mask)
        writeback = []
        for key in lists:
            for j, t in enumerate(lists[key]):
                if _needs_copy(t):
                    c = t.contiguous()
                    if key not in ("grads", "masks"):
                        writeback.append((t, c))
                    lists[key][j] = c
        lr, lr_tensor = self._lr(group, device)
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        impl = backends.implementation(FAMILY, backends.resolve(FAMILY, group["backend"], device))
        tensor_args = [lists["params"], lists["grads"]]
        tensor_args += [lists[n] if n is not None else [] for n in names]
        tensor_args += [lists["masters"], lists["masks"]]
        getattr(impl, self._op)(*tensor_args, lr=lr, l1=float(group["l1"]), lr_tensor=lr_tensor,
                                grad_scale=grad_scale, found_inf=found_inf, **self._hyper(group, step, extra))
        for dst, src in writeback:
            dst.copy_(src)


def bias_corrections(beta1, beta2, step):
    """(1 - beta1**step, sqrt(1 - beta2**step)) in double precision, as torch.optim computes them."""
    return 1 - beta1**step, math.sqrt(1 - beta2**step)
