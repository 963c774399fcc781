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
        # Validate every group before updating any: a bad input leaves nothing half-updated.
        checked = [self._check(gi, group) for gi, group in enumerate(self.param_groups)]
        plans = [(plan or self._build_plan(gi, group, grads, has, masks), grads)
                 for gi, (group, (plan, grads, has, masks)) in enumerate(zip(self.param_groups, checked))]
        if found_inf is not None and self._has_step and bool(found_inf.item() != 0):
            # Step counts live on the host (torch's default layout), so a skipped step reads found_inf once.
            return loss
        for group, (plan, grads) in zip(self.param_groups, plans):
            if plan is not None:
                self._run(group, plan, grads, grad_scale, found_inf)
        return loss

    def _lr(self, group, device):
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device.type == "cpu":
                return float(lr), None
            return 0.0, lr.detach().reshape(1).to(device=device, dtype=torch.float32)
        return float(lr), None

    def _check(self, gi, group):
        """(plan, grads, has, masks): the cached plan while nothing it depends on changed, else None (validated).

        A plan holds the kernel-ready lists of every bucket except the gradients, which are new tensors after
        each ``zero_grad()``; it depends on which parameters have gradients, their masks, and the state dict.
        """
        params = group["params"]
        grads = [p.grad for p in params]
        has = [g is not None for g in grads]
        masks = [getattr(p, sparsity._ATTR, None) for p in params]
        plan = self._plans.get(gi) if hasattr(self, "_plans") else None
        if (plan is None or plan.has != has or plan.state is not self.state or plan.stale
                or not all(a is b for a, b in zip(masks, plan.masks))):
            for i, g in enumerate(grads):
                if g is not None:
                    self._validate(gi, i, params[i], g)
            plan = None
        return plan, grads, has, masks

    def _validate(self, gi, i, p, g):
        name = type(self).__name__
        if g.device != p.device:
            raise ValueError(f"{name}: parameter {i} of param group {gi} is on {p.device} "
                             f"but its gradient is on {g.device}")
        if g.dtype != p.dtype and not g.is_sparse:
            raise TypeError(f"{name}: parameter {i} of param group {gi} has dtype {p.dtype} "
                            f"but its gradient has dtype {g.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{name}: parameter {i} of param group {gi} has shape {tuple(p.shape)} "
                             f"but its gradient has shape {tuple(g.shape)}")
        if g.is_sparse and (sparsity.get_mask(p) is not None or self.param_groups[gi]["l1"] != 0):
            raise RuntimeError(f"{name}: parameter {i} of param group {gi} has a sparse gradient; "
                               "masks and l1 need dense gradients")

    def _build_plan(self, gi, group, grads, has, masks):
        if not hasattr(self, "_plans"):
            self._plans = {}
        self._plans.pop(gi, None)
        idx = [i for i, h in enumerate(has) if h]
        if not idx:
            return None
        master = group["master_weights"]
        sparse = []
        for i in idx:
            p = group["params"][i]
            state = self.state[p]
            if len(state) == 0 or (self._has_step and "step" not in state):
                self._init_state(p, group, state)
            if master and p.dtype in (torch.float16, torch.bfloat16) and "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
            if grads[i].is_sparse:
                sparse.append(i)
        dense = [i for i in idx if i not in set(sparse)]
        steps = None
        if self._has_step and dense:
            # One storage for all step counts: a step adds 1 to every count with one op. Each state["step"]
            # stays a 0-dim CPU float32 tensor of its own (a view of one element), as torch.optim expects.
            steps = torch.tensor([float(self.state[group["params"][i]]["step"]) for i in dense], dtype=torch.float32)
            for j, i in enumerate(dense):
                self.state[group["params"][i]]["step"] = steps[j]
        buckets = {}
        for j, i in enumerate(dense):
            p = group["params"][i]
            state = self.state[p]
            key = (p.device, p.dtype, float(steps[j]) if steps is not None else 0.0, masks[i] is not None,
                   "master_param" in state, self._bucket_extra(group, state))
            buckets.setdefault(key, []).append((i, j))
        plan = _Plan(has, masks, self.state, sparse, steps)
        for (device, _, _, masked, has_master, extra), members in buckets.items():
            plan.buckets.append(self._make_bucket(group, device, extra, members, masked, has_master, masks))
            if extra is False:
                plan.stale = True  # SGD's first momentum step creates buffers: the next step needs a new plan
        self._plans[gi] = plan
        return plan

    def _make_bucket(self, group, device, extra, members, masked, has_master, masks):
        params = group["params"]
        self._prepare(group, [(params[i], None, self.state[params[i]], None) for i, _ in members], extra)
        names = self._state_lists(group)
        cplx = params[members[0][0]].is_complex()
        if cplx and masked:
            raise TypeError(f"{type(self).__name__}: complex parameters cannot carry a mask")
        if cplx and group["l1"] != 0:
            raise ValueError(f"{type(self).__name__}: l1 is not defined for complex parameters")
        view = torch.view_as_real if cplx else (lambda t: t)
        lists = {"params": [view(params[i]) for i, _ in members]}
        for n in names:
            if n is not None:
                lists[n] = [view(self.state[params[i]][n]) for i, _ in members]
        lists["masters"] = [self.state[params[i]]["master_param"] for i, _ in members] if has_master else []
        lists["masks"] = [masks[i] for i, _ in members] if masked else []
        # Kernels take contiguous tensors: a non-contiguous one runs on a contiguous copy written back after.
        copies = []
        for key, ts in lists.items():
            for j, t in enumerate(ts):
                if not t.is_contiguous():
                    copies.append((key, j, t))
        return _Bucket(device, extra, [i for i, _ in members], members[0][1], lists, names, copies, cplx)

    def _run(self, group, plan, grads, grad_scale, found_inf):
        for i in plan.sparse:
            p = group["params"][i]
            self._sparse_step(group, p, grads[i], self.state[p], self._lr(group, p.device))
        if plan.steps is not None:
            plan.steps.add_(1)
        for b in plan.buckets:
            self._launch(group, plan, b, grads, grad_scale, found_inf)

    def _launch(self, group, plan, b, grads, grad_scale, found_inf):
        lists = dict(b.lists)
        gs = [grads[i] for i in b.idx]
        if b.complex:
            gs = [torch.view_as_real(g) for g in gs]
        lists["grads"] = [g if g.is_contiguous() else g.contiguous() for g in gs]
        writeback = []
        if b.copies:
            lists = {k: list(v) for k, v in lists.items()}
            for key, j, t in b.copies:
                c = t.contiguous()
                lists[key][j] = c
                if key != "masks":
                    writeback.append((t, c))
        step = float(plan.steps[b.rep]) if plan.steps is not None else 0.0
        lr, lr_tensor = self._lr(group, b.device)
        if grad_scale is not None and grad_scale.device != b.device:
            grad_scale = grad_scale.to(b.device, non_blocking=True)
        if found_inf is not None and found_inf.device != b.device:
            found_inf = found_inf.to(b.device, non_blocking=True)
        impl = backends.implementation(FAMILY, backends.resolve(FAMILY, group["backend"], b.device))
        args = [lists["params"], lists["grads"]] + [lists[n] if n is not None else [] for n in b.names]
        args += [lists["masters"], lists["masks"]]
        getattr(impl, self._op)(*args, lr=lr, l1=float(group["l1"]), lr_tensor=lr_tensor, grad_scale=grad_scale,
                                found_inf=found_inf, **self._hyper(group, step, b.extra))
        for dst, src in writeback:
            dst.copy_(src)

    def _bucket_extra(self, group, state):
        """Anything else that must be uniform within one kernel call (SGD: whether the buffer exists yet)."""
        return None

    def _prepare(self, group, items, extra):
        """Creates any state the kernel needs before this call (SGD: momentum buffers on the first step)."""


class _Plan:
    """What one param group's step launches, cached across steps (see FusedOptimizer._plan)."""

    def __init__(self, has, masks, state, sparse, steps):
        self.has, self.masks, self.state, self.sparse, self.steps = has, masks, state, sparse, steps
        self.buckets = []
        self.stale = False


class _Bucket:
    """One kernel call: parameters sharing device, dtype, step count, mask and master presence."""

    def __init__(self, device, extra, idx, rep, lists, names, copies, complex_):
        self.device, self.extra, self.idx, self.rep = device, extra, idx, rep
        self.lists, self.names, self.copies, self.complex = lists, names, copies, complex_


def bias_corrections(beta1, beta2, step):
    """(1 - beta1**step, sqrt(1 - beta2**step)) in double precision, as torch.optim computes them."""
    return 1 - beta1**step, math.sqrt(1 - beta2**step)
