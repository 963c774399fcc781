"""FusedOptimizer: what every nnopt optimizer shares — state, validation, grouping and dispatch to a backend.

A subclass names its kernel (``_op``), creates its per-parameter state (``_init_state``), lists the state
tensors the kernel updates (``_state_lists``) and turns a group's hyperparameters into the kernel's keyword
arguments (``_hyper``). Everything else is here, once:

- state keys and layout are torch.optim's, so checkpoints move both ways between torch.optim and nnopt.optim.
  ``step`` is a float32 0-dim tensor: on the CPU for CPU parameters (torch's default path), on the parameter's
  device otherwise (torch's fused layout), where the kernels read it: a step never reads a count on the host;
- ``step()`` groups the parameters that have gradients by (device, dtype, step count, mask, master copy) and
  makes one backend call per group: O(1) kernel launches however many tensors;
- complex parameters run on their real view (as torch does); dense non-contiguous ones (transposed,
  channels_last) as flat views in memory order; others on contiguous copies written back; sparse gradients
  follow torch's own path where torch accepts them (SGD, Adagrad);
- the kernel-ready lists are cached per group (a plan) and reused while every parameter, state tensor and
  mask they hold is the same object; gradients are taken fresh each step;
- GradScaler: ``grad_scale`` and ``found_inf`` (set on the optimizer by ``GradScaler.step``) go into the kernels,
  which unscale the gradients; a step with a non-finite gradient changes no parameter and no state (device step
  counts advance by ``1 - found_inf``). No host synchronisation, except while a plan is (re)built (the first
  step, after a change of parameters or state) or for CPU parameters, whose counts live on the host;
- DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): the step runs on each rank's local shards,
  one kernel call per group of them, as for plain tensors. ``self.state`` keeps DTensors (created with
  ``zeros_like(p)``, so sharded like the parameter: ``torch.distributed.checkpoint`` saves and reshards them); the
  plan holds their local tensors, and a mask attached to a DTensor parameter must be a DTensor sharded like it
  (``nnopt.distributed.shard_masks``). Plain parameters pay one type check per tensor when a plan is built.
"""

import itertools
import math
import operator
import sys
import warnings

import torch

from nnopt import backends, sparsity

FAMILY = "fused_optim"
_DEVICES = ("cpu", "cuda")  # where nnopt's kernels run


def check_nonneg(value, what):
    """torch.optim's validation: ``what`` must be a non-negative number (or one-element tensor)."""
    v = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v >= 0.0):
        raise ValueError(f"Invalid {what}: {value}")


def check_lr(lr, foreach=None, capturable=False, tensor_with_foreach=True):
    """torch.optim's checks of ``lr``: a non-negative number or one-element tensor. Optimizers whose torch twin
    rejects a tensor lr with ``foreach=True`` (Adam, AdamW) pass ``tensor_with_foreach=False``: nnopt ignores
    foreach, but the same arguments must fail the same way."""
    if isinstance(lr, torch.Tensor):
        if not tensor_with_foreach and foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    check_nonneg(lr, "learning rate")


def check_betas(betas, foreach=None, capturable=False):
    """torch.optim.Adam's checks of ``betas``: each in [0, 1), both floats or both one-element tensors (a tensor
    not with ``foreach=True``)."""
    for i, beta in enumerate(betas):
        b = beta.item() if isinstance(beta, torch.Tensor) and beta.numel() == 1 else beta
        if isinstance(b, torch.Tensor) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def _as_float(value):
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _dtensor_type():
    """torch's DTensor class when torch.distributed.tensor is loaded, else None: no DTensor can exist before that
    import, and ``import nnopt`` does not pay for it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _local(t, dtensor):
    """The local shard of a DTensor (the tensor itself, under no_grad: in-place updates reach the DTensor)."""
    return t.to_local() if isinstance(t, dtensor) else t


class FusedOptimizer(torch.optim.Optimizer):
    """Base class; see the subclasses in nnopt.optim for the constructor arguments."""

    _step_supports_amp_scaling = True
    _op = None  # the kernel's name in the fused_optim family
    _has_step = True  # whether state["step"] exists (all but SGD)
    _kernel_takes_step = False  # whether the kernel derives scalars from the count (Adam, Adagrad)
    # Whether _traced_step (below) is this optimizer's whole step under torch.compile: true for those whose step is
    # the shared launch with at most 3 state lists and no host-side state of their own, once tests/optim/
    # test_compile.py covers them; the others run their eager step there (correct, with graph breaks).
    _traceable = False

    @staticmethod
    def _counts_on_device(device):
        """Whether the step counts of parameters on ``device`` live there (read by the kernels) or on the host."""
        return device.type != "cpu"

    def __init__(self, params, defaults, *, backend=None, master_weights=False, l1=0.0, differentiable=False,
                 capturable=False):
        name = type(self).__name__
        check_nonneg(l1, "l1 value")
        if backend is not None and backend not in backends.CHOICES:
            raise ValueError(f"{name}: unknown backend {backend!r}; choose one of {', '.join(backends.CHOICES)}")
        if differentiable:
            raise ValueError(f"{name}: differentiable=True is not supported by nnopt's fused kernels")
        if capturable:
            raise ValueError(f"{name}: capturable=True is not supported (nnopt's step is not CUDA-graph capturable)")
        defaults = dict(defaults, l1=l1, master_weights=bool(master_weights), backend=backend,
                        foreach=None, fused=None, capturable=False, differentiable=False)
        super().__init__(params, defaults)

    # -- torch.optim.Optimizer hooks -----------------------------------------------------------------------

    _supports_sparse = False  # SGD and Adagrad follow torch's own path for sparse gradients
    _NNOPT_KEYS = ("l1", "master_weights", "backend")

    def add_param_group(self, param_group):
        """torch's add_param_group, after checking dtypes, duplicates and backend (a rejected group is not added)."""
        name, gi = type(self).__name__, len(self.param_groups)
        if not isinstance(param_group, dict):
            raise TypeError(f"{name}: a param group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)  # a generator is read once
        param_group = dict(param_group, params=params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # torch also takes (name, param) pairs
        for i, p in enumerate(tensors):
            if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"{name}: parameter {i} of param group {gi} has dtype {p.dtype}; "
                                "only floating-point and complex parameters can be optimized")
        if len({id(p) for p in tensors}) != len(tensors):
            # torch's words (it warns, then updates such a parameter twice); nnopt's step refuses the group
            warnings.warn("optimizer contains a parameter group with duplicate parameters; in future, this will "
                          "cause an error; see github.com/pytorch/pytorch/issues/40967 for more information",
                          stacklevel=3)
        if param_group.get("backend") not in backends.CHOICES + (None,):
            raise ValueError(f"{name}: unknown backend {param_group['backend']!r} in param group {gi}")
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._group_defaults().items():
                group.setdefault(key, value)
        self._plans = {}

    def _group_defaults(self):
        return dict(l1=0.0, master_weights=False, backend=None, maximize=False, foreach=None, fused=None,
                    capturable=False, differentiable=False)

    def load_state_dict(self, state_dict):
        """Loads a checkpoint of this optimizer or of its torch.optim twin.

        A torch.optim checkpoint has no nnopt keys (l1, master_weights, backend): the groups keep their current
        values. fp32 masters and fp32 states of bf16/fp16 parameters stay fp32 (torch's loader would cast them).
        """
        saved = {}
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            s = state_dict["state"].get(pid)
            if s is not None:
                saved[p] = {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
        current = [{k: g[k] for k in self._NNOPT_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, old, saved_group in zip(self.param_groups, current, state_dict["param_groups"]):
            for k, v in old.items():
                if k not in saved_group:
                    group[k] = v
        for group in self.param_groups:
            fp32 = group["master_weights"]
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if "step" in st and isinstance(st["step"], torch.Tensor):
                    st["step"] = st["step"].detach().to("cpu", torch.float32)
                if fp32 and p.dtype in (torch.float16, torch.bfloat16):
                    for k, v in saved.get(p, {}).items():
                        if k != "step" and v.is_floating_point():
                            st[k] = v.detach().to(device=p.device, dtype=torch.float32).clone()
        self._plans = {}

    @torch.no_grad()
    def sync_master_weights(self):
        """Copies each parameter into its fp32 master. The master is authoritative: call this after writing to
        a bf16/fp16 parameter outside the optimizer (loading a model checkpoint, clipping weights)."""
        for group in self.param_groups:
            for p in group["params"]:
                master = self.state.get(p, {}).get("master_param")
                if master is not None:
                    master.copy_(p)

    # -- what a subclass provides ----------------------------------------------------------------------

    def _init_state(self, p, group, state):
        """Creates the state entries that ``state`` lacks (never overwrites one)."""
        raise NotImplementedError

    def _state_lists(self, group):
        """Names of the state tensors the kernel takes, in its argument order (None for an empty list)."""
        raise NotImplementedError

    def _hyper(self, group, step, extra):
        """The kernel's keyword arguments besides lr, l1, lr_tensor, grad_scale and found_inf."""
        raise NotImplementedError

    def _state_tensor(self, p, name):
        """The tensor the kernel takes for state ``name`` of ``p`` (Adafactor maps names by the parameter's rank)."""
        return self.state[p][name]

    def _sparse_step(self, group, p, grad, state, lr):
        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    def _bucket_extra(self, group, state):
        """Anything else that must be uniform within one kernel call (SGD: whether the buffer exists yet)."""
        return None

    def _prepare(self, group, params, extra):
        """Creates any state the kernel needs before this call (SGD: momentum buffers on the first step)."""

    def _state_dtype(self, p, group):
        return torch.float32 if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16) else p.dtype

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
        if (torch.compiler.is_compiling() and self._traceable and self._trace_supported()
                and not any(p.is_complex() for g in self.param_groups for p in g["params"])):
            for group in self.param_groups:
                self._traced_step(group, grad_scale, found_inf)
            return loss
        if not hasattr(self, "_plans"):
            self._plans = {}
        # Validate every group before updating any: a bad input leaves nothing half-updated.
        checked = [self._check(gi, group) for gi, group in enumerate(self.param_groups)]
        if found_inf is not None:
            # Host step counts (CPU parameters), sparse gradients and a plan being built (which may create state,
            # e.g. SGD's first momentum buffers) need to know here whether the step is skipped: then found_inf is
            # read once. Otherwise it is read on the device only, by the kernels and the count update.
            host = any(c[0] is None or c[0].sparse or c[0].host_counts for c in checked)
            if host and bool(found_inf.item() != 0):
                return loss
        for gi, (group, (plan, grads, has, fp)) in enumerate(zip(self.param_groups, checked)):
            if plan is None:
                plan = self._build_plan(gi, group, grads, has)
            if plan is not None:
                self._run(group, plan, grads, grad_scale, found_inf)
        return loss

    # -- under torch.compile --------------------------------------------------------------------------------
    # Dynamo runs a method named ``_init_group`` eagerly at trace time (as for torch.optim's optimizers): it
    # validates, creates state and buckets the parameters, filling the empty lists it is given; dynamo then guards
    # on what it read (parameters, gradients present, state tensors) and the traced code below only launches. So
    # a compiled step traces once, without a graph break, and runs no plan check: the guards are the check.
    # Step counts are read by the kernels (the ``step=`` tensor), never on the host. (SGD's first momentum step,
    # which creates the buffers, compiles a second, steady graph; sparse gradients and DTensors take the eager
    # path; so do complex parameters, whose real views AOT's functionalisation does not rebuild.)

    def _trace_supported(self):
        """Whether the traced step can run this optimizer's configuration (a mixin narrows it)."""
        return True

    def _init_group(self, group, params, grads, s0, s1, s2, masters, masks, steps):
        """Fills the lists with ``group``'s parameters that have gradients, bucket by bucket; returns the buckets
        as constants: (start, end, device, backend, extra, whether masks and masters are given, indices that need
        a layout)."""
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        ps = group["params"]
        if len(set(map(id, ps))) != len(ps):
            raise ValueError(f"{type(self).__name__}: param group {gi} holds the same parameter twice")
        idx = [i for i, p in enumerate(ps) if p.grad is not None]
        for i in idx:
            self._validate(gi, i, ps[i], ps[i].grad)
            if ps[i].grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__}: sparse gradients are not supported under torch.compile")
            self._ensure_state(ps[i], group)
        buckets = {}
        for i in idx:
            p, st = ps[i], self.state.get(ps[i], {})
            count = float(st["step"]) if "step" in st else 0.0  # trace time: bucket members share their count
            key = (p.device, p.dtype, count, sparsity.get_mask(p) is not None, "master_param" in st,
                   self._bucket_extra(group, st))
            buckets.setdefault(key, []).append(i)
        names = self._state_lists(group)
        out = []
        for (device, _, _, masked, has_master, extra), members in buckets.items():
            start = len(params)
            special = []
            for i in members:
                p, st = ps[i], self.state[ps[i]] if ps[i] in self.state else {}
                tensors = [p] + [st[n] for n in names if n in st] + ([st["master_param"]] if has_master else [])
                if p.is_complex() or not all(t.is_contiguous() for t in tensors + [p.grad]):
                    special.append(len(params) - start)
                params.append(p)
                grads.append(p.grad)
                for lst, n in zip((s0, s1, s2), names):
                    if n is not None and n in st:  # (else created by _prepare in the traced step)
                        lst.append(st[n])
                if has_master:
                    masters.append(st["master_param"])
                if masked:
                    masks.append(sparsity.get_mask(p))
                if self._has_step:
                    steps.append(st["step"])
            backend = backends.resolve(FAMILY, group["backend"], device)
            out.append((start, len(params), str(device), backend, extra, masked, has_master, tuple(special)))
        return tuple(out)

    def _traced_step(self, group, grad_scale, found_inf):
        params, grads, s0, s1, s2, masters, masks, steps = [], [], [], [], [], [], [], []
        buckets = self._init_group(group, params, grads, s0, s1, s2, masters, masks, steps)
        names = self._state_lists(group)
        if steps:
            torch._foreach_add_(steps, 1)
            if found_inf is not None:
                torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
        for start, end, device, backend, extra, masked, has_master, special in buckets:
            lists = {"params": params[start:end], "grads": grads[start:end]}
            if extra is False:  # SGD's first momentum step creates its buffers in the graph: the next call retraces
                self._prepare(group, lists["params"], extra)
            for lst, n in zip((s0, s1, s2), names):
                if n is not None:
                    lists[n] = lst[start:end] if extra is not False else [self.state[p][n] for p in lists["params"]]
            lists["masters"] = masters[start:end] if has_master else []
            lists["masks"] = masks[start:end] if masked else []
            writeback = []
            for j in special:
                keys = [k for k in lists if lists[k] and k != "grads"]
                arranged, wb = _layout({k: lists[k][j] for k in keys}, lists["grads"][j])
                for k in keys + ["grads"]:
                    lists[k][j] = arranged[k]
                writeback += wb
            lr = group["lr"]
            lr_tensor = lr.detach().reshape(1).to(device=device, dtype=torch.float32) if isinstance(
                lr, torch.Tensor) else None
            hyper = self._hyper(group, 1.0, extra)
            if self._kernel_takes_step:
                hyper["step"] = steps[start]
            if backend in ("cpu", "cuda"):  # the registered op (its fake kernel traces it)
                kernel = getattr(torch.ops.nnopt, self._op + "_")
            else:
                kernel = getattr(backends.implementation(FAMILY, backend), self._op)
            args = [lists["params"], lists["grads"]] + [lists[n] if n is not None else [] for n in names]
            kernel(*args, lists["masters"], lists["masks"], lr=0.0 if lr_tensor is not None else lr, l1=group["l1"],
                   lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, **hyper)
            for dst, src in writeback:
                dst.copy_(src)

    def _lr(self, group, device):
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device.type == "cpu":
                return float(lr), None
            return 0.0, lr.detach().reshape(1).to(device=device, dtype=torch.float32)
        return float(lr), None

    def _fingerprint(self, group, has, dtensor=None):
        """Every object a plan depends on, compared by identity each step: the parameters, their state dicts
        and state tensors, their masks, and the kernel's configuration. With ``dtensor`` (the DTensor class, for
        plans holding DTensors) also the local tensors of the DTensors: FSDP2 may give a sharded parameter a new
        local tensor (``reset_sharded_param``) while the DTensor object stays."""
        params = list(itertools.compress(group["params"], has))
        states = list(map(self.state.get, params))
        names = tuple(self._state_lists(group))
        keys = [n for n in names if n is not None] + ["master_param", "step"]
        tensors = [st.get(k) for st in states if st is not None for k in keys]  # (states fixes the alignment)
        masks = [getattr(p, sparsity._ATTR, None) for p in params]
        config = (names, group["master_weights"], group["l1"] != 0)
        objs = params + states + tensors + masks
        if dtensor is not None:
            objs += [t.to_local() for t in params + tensors + masks if isinstance(t, dtensor)]
        return objs, config

    def _check(self, gi, group):
        """(plan or None, grads, has, fingerprint): the cached plan while nothing it depends on changed."""
        params = group["params"]
        grads = [p.grad for p in params]
        has = [g is not None for g in grads]
        plan = self._plans.get(id(group))
        if plan is not None and plan.group is group and plan.has == has and not plan.stale:
            objs, config = self._fingerprint(group, has, plan.dtensor)
            if config == plan.config and len(objs) == len(plan.objs) and all(map(operator.is_, objs, plan.objs)):
                return plan, grads, has, None
        if len(set(map(id, params))) != len(params):
            raise ValueError(f"{type(self).__name__}: param group {gi} holds the same parameter twice; torch.optim "
                             "updates it twice, nnopt's one kernel call per group cannot: remove the duplicate")
        for i, g in enumerate(grads):
            if g is not None:
                self._validate(gi, i, params[i], g)
        return None, grads, has, None

    def _validate(self, gi, i, p, g):
        name = type(self).__name__
        where = f"parameter {i} of param group {gi}"
        if p.device.type not in _DEVICES:
            # torch's words for its fused path (the test suites match them); meta parameters with gradients included
            raise RuntimeError(f"{name}: nnopt's step is fused, and `fused=True` requires all the params to be "
                               f"floating point Tensors of supported devices: {list(_DEVICES)}; {where} is on "
                               f"{p.device}")
        if g.device != p.device:
            raise ValueError(f"{name}: {where} is on {p.device} but its gradient is on {g.device}")
        dtensor = _dtensor_type()
        if dtensor is not None and (isinstance(p, dtensor) or isinstance(g, dtensor)):
            _check_sharding(name, where, p, g, sparsity.get_mask(p), dtensor)
        if g.is_sparse:
            if not self._supports_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients ({where})")
            if sparsity.get_mask(p) is not None or self.param_groups[gi]["l1"] != 0:
                raise RuntimeError(f"{name}: {where} has a sparse gradient; masks and l1 need dense gradients")
        elif g.dtype != p.dtype:
            raise TypeError(f"{name}: {where} has dtype {p.dtype} but its gradient has dtype {g.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{name}: {where} has shape {tuple(p.shape)} but its gradient has shape {tuple(g.shape)}")
        if p.is_complex() and (sparsity.get_mask(p) is not None or self.param_groups[gi]["l1"] != 0):
            raise ValueError(f"{name}: {where} is complex; masks and l1 need real parameters")

    def _ensure_state(self, p, group):
        """Creates what ``p``'s state lacks (and its fp32 master); no empty entry for a parameter without state
        (momentum-free SGD), as in torch."""
        state = self.state.get(p, {})
        self._init_state(p, group, state)
        if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32).clone(memory_format=torch.preserve_format)
        if state:
            self.state[p] = state

    def _build_plan(self, gi, group, grads, has):
        self._plans.pop(id(group), None)
        idx = [i for i, h in enumerate(has) if h]
        if not idx:
            return None
        params = group["params"]
        for i in idx:
            self._ensure_state(params[i], group)
        sparse = [i for i in idx if grads[i].is_sparse]
        dense = [i for i in idx if not grads[i].is_sparse]
        # (device holding the counts, whether the kernels read them there) -> [storage, counts read now, indices]
        counts = {}
        if self._has_step and dense:
            # One storage per device for all step counts: a step adds 1 to every count with one op. Each
            # state["step"] stays a 0-dim float32 tensor of its own (a view of one element), as torch.optim expects.
            for i in dense:
                p = params[i]
                on_device = self._counts_on_device(p.device)
                where = (p.device if on_device else torch.device("cpu"), on_device)
                counts.setdefault(where, [None, [], []])
                counts[where][1].append(float(self.state[p]["step"]))  # a plan build may read counts: rare
                counts[where][2].append(i)
            for (device, _), entry in counts.items():
                entry[0] = torch.tensor(entry[1], dtype=torch.float32, device=device)
                for j, i in enumerate(entry[2]):
                    self.state[params[i]]["step"] = entry[0][j]
        slot = {i: (where, j) for where, entry in counts.items() for j, i in enumerate(entry[2])}
        buckets = {}
        for i in dense:
            p = params[i]
            state = self.state.get(p, {})
            where, j = slot.get(i, (None, 0))
            key = (p.device, p.dtype, where, counts[where][1][j] if where is not None else 0.0,
                   sparsity.get_mask(p) is not None, "master_param" in state, self._bucket_extra(group, state))
            buckets.setdefault(key, []).append((i, j))
        plan = _Plan(group, has, sparse, [(entry[0], on_device) for (_, on_device), entry in counts.items()])
        dtensor = _dtensor_type()
        if dtensor is not None and any(isinstance(params[i], dtensor) for i in idx):
            plan.dtensor = dtensor
        for (device, _, where, _, masked, has_master, extra), members in buckets.items():
            self._prepare(group, [params[i] for i, _ in members], extra)
            count = None
            if where is not None:  # this bucket's (uniform) step count: a one-element view
                rep = members[0][1]
                count = (counts[where][0][rep:rep + 1], where[1])
            plan.buckets.append(self._make_bucket(group, device, extra, members, masked, has_master, count,
                                                  plan.dtensor))
            if extra is False:
                plan.stale = True  # SGD's first momentum step creates buffers: the next step needs a new plan
        plan.objs, plan.config = self._fingerprint(group, has, plan.dtensor)
        self._plans[id(group)] = plan
        return plan

    def _make_bucket(self, group, device, extra, members, masked, has_master, count, dtensor=None):
        params = group["params"]
        names = self._state_lists(group)
        ps = [params[i] for i, _ in members]
        lists = {"params": ps}
        for n in names:
            if n is not None:
                lists[n] = [self._state_tensor(p, n) for p in ps]
        lists["masters"] = [self.state[p]["master_param"] for p in ps] if has_master else []
        lists["masks"] = [sparsity.get_mask(p) for p in ps] if masked else []
        local_grads = None
        if dtensor is not None and any(isinstance(p, dtensor) for p in ps):
            # The kernels run on the local shards; self.state keeps the DTensors (checkpoints see the sharding).
            where = type(self).__name__
            for k, ts in lists.items():
                for j, t in enumerate(ts):
                    if k != "params" and isinstance(ps[j], dtensor):
                        _check_state_sharding(where, k, ps[j], t, dtensor)
            lists = {k: [_local(t, dtensor) for t in ts] for k, ts in lists.items()}
            local_grads = dtensor
        # Complex or non-contiguous parameters are rearranged at each launch (see _layout): only they pay.
        special = [j for j, p in enumerate(ps)
                   if p.is_complex() or not all(ts[j].is_contiguous() for ts in lists.values() if ts)]
        return _Bucket(device, extra, [i for i, _ in members], count, lists, names, special, local_grads)

    def _run(self, group, plan, grads, grad_scale, found_inf):
        for i in plan.sparse:
            p = group["params"][i]
            g = grads[i] if grad_scale is None else grads[i] * (1.0 / float(grad_scale))
            self._sparse_step(group, p, g, self.state[p], self._lr(group, p.device))
        for storage, on_device in plan.counts:
            storage.add_(1)
            if found_inf is not None and on_device:  # (host counts: step() returned early if found_inf != 0)
                storage.sub_(found_inf.to(storage.device, non_blocking=True))
        for b in plan.buckets:
            self._launch(group, plan, b, grads, grad_scale, found_inf)

    def _launch(self, group, plan, b, grads, grad_scale, found_inf):
        lists = b.lists
        gs = b.take(grads)
        if b.local_grads is not None:
            gs = [_local(g, b.local_grads) for g in gs]
        writeback = []
        if b.special:
            lists = {k: list(v) for k, v in lists.items()}
            for j in b.special:
                keys = [k for k in lists if lists[k]]
                arranged, wb = _layout({k: lists[k][j] for k in keys}, gs[j])
                for k in keys:
                    lists[k][j] = arranged[k]
                gs[j] = arranged["grads"]
                writeback += wb
        if not all(map(torch.Tensor.is_contiguous, gs)):
            gs = [g.contiguous() for g in gs]
        lists = dict(lists, grads=gs)
        count, on_device = b.count if b.count is not None else (None, False)
        step = float(count) if count is not None and not on_device else 1.0  # 1.0: the kernel reads the count
        lr, lr_tensor = self._lr(group, b.device)
        if grad_scale is not None and grad_scale.device != b.device:
            grad_scale = grad_scale.to(b.device, non_blocking=True)
        if found_inf is not None and found_inf.device != b.device:
            found_inf = found_inf.to(b.device, non_blocking=True)
        requested = backends.requested(group["backend"])
        if b.kernel is None or b.kernel[0] != requested:  # resolved once per bucket while the request holds
            impl = backends.implementation(FAMILY, backends.resolve(FAMILY, requested, b.device))
            b.kernel = (requested, getattr(impl, self._op))
        args = [lists["params"], lists["grads"]] + [lists[n] if n is not None else [] for n in b.names]
        args += [lists["masters"], lists["masks"]]
        hyper = self._hyper(group, step, b.extra)
        if on_device and self._kernel_takes_step:
            hyper["step"] = count
        b.kernel[1](*args, lr=lr, l1=float(group["l1"]), lr_tensor=lr_tensor, grad_scale=grad_scale,
                    found_inf=found_inf, **hyper)
        for dst, src in writeback:
            dst.copy_(src)


def _sharding(t):
    return t.device_mesh, tuple(t.placements)


def _check_sharding(name, where, p, g, mask, dtensor):
    """A DTensor parameter's gradient and mask must be DTensors sharded like it (the kernel pairs local shards)."""
    if not isinstance(p, dtensor):
        raise TypeError(f"{name}: {where} is a plain tensor but its gradient is a DTensor")
    if not isinstance(g, dtensor):
        raise TypeError(f"{name}: {where} is a DTensor but its gradient is a plain tensor")
    if _sharding(g) != _sharding(p):
        raise ValueError(f"{name}: {where} has placements {p.placements} but its gradient has {g.placements}")
    if mask is not None and (not isinstance(mask, dtensor) or _sharding(mask) != _sharding(p)):
        got = mask.placements if isinstance(mask, dtensor) else "a plain tensor"
        raise ValueError(f"{name}: the mask of {where} must be a DTensor sharded like it ({p.placements}), got "
                         f"{got}; nnopt.distributed.shard_masks(model) shards the masks of a fully_shard model")


def _check_state_sharding(name, key, p, t, dtensor):
    """A state tensor (or master, or mask) of a DTensor parameter must be sharded like it, with the same local
    shape: one loaded from an unsharded checkpoint with torch.optim's load_state_dict is not."""
    if not isinstance(t, dtensor) or _sharding(t) != _sharding(p) or t.to_local().shape != p.to_local().shape:
        got = f"a DTensor with placements {t.placements}" if isinstance(t, dtensor) else "a plain tensor"
        raise ValueError(f"{name}: the {key} of a DTensor parameter ({p.placements}) is {got}; load sharded "
                         "checkpoints with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict")


def _dense_flat(t):
    """A 1-D view of ``t`` in memory order when its elements tile its storage span exactly, else None. (Dims
    ordered by stride, then a view: no storage offsets, so dynamo traces it too.)"""
    if t.dim() == 0:
        return t.reshape(1)
    v = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return v.view(-1) if v.is_contiguous() else None


def _layout(tensors, grad):
    """Kernel-ready (contiguous) versions of one parameter's tensors, and the (original, copy) pairs to write back.

    Complex tensors become their real views. When every tensor shares the parameter's dense strides (a
    transposed or channels_last weight), flat views in memory order are passed: no copy. Otherwise each tensor
    runs on a contiguous copy, and the mutated ones are written back after the kernel.
    """
    tensors = dict(tensors, grads=grad)
    tensors = {k: torch.view_as_real(t) if t.is_complex() else t for k, t in tensors.items()}
    if all(t.is_contiguous() for t in tensors.values()):
        return tensors, []
    p = tensors["params"]
    if tensors["grads"].stride() != p.stride():
        tensors["grads"] = torch.empty_like(p).copy_(tensors["grads"])
    if all(t.stride() == p.stride() for t in tensors.values()):
        flat = {k: _dense_flat(t) for k, t in tensors.items()}
        if all(f is not None for f in flat.values()):
            return flat, []
    out, wb = {}, []
    for k, t in tensors.items():
        c = t.contiguous()
        out[k] = c
        if k not in ("grads", "masks") and c is not t:
            wb.append((t, c))
    return out, wb


class _Plan:
    """What one param group's step launches, cached across steps while its fingerprint holds."""

    def __init__(self, group, has, sparse, counts):
        self.group, self.has, self.sparse, self.counts = group, has, sparse, counts
        self.host_counts = any(not on_device for _, on_device in counts)
        self.buckets = []
        self.stale = False
        self.objs, self.config = [], None
        self.dtensor = None  # the DTensor class when the plan holds DTensors (their local tensors are fingerprinted)


class _Bucket:
    """One kernel call: parameters sharing device, dtype, step count, mask and master presence. ``count`` is
    (a one-element view of the step count they share, whether the kernel reads it there), or None."""

    def __init__(self, device, extra, idx, count, lists, names, special, local_grads=None):
        self.device, self.extra, self.idx, self.count = device, extra, idx, count
        self.lists, self.names, self.special = lists, names, special
        self.local_grads = local_grads  # the DTensor class when the kernel takes the gradients' local shards
        self.take = lambda grads, idx=tuple(idx): list(map(grads.__getitem__, idx))  # this bucket's gradients
        self.kernel = None  # (the backend requested, its function), set by the first launch


def bias_corrections(beta1, beta2, step):
    """(1 - beta1**step, sqrt(1 - beta2**step)) in double precision, as torch.optim computes them."""
    return 1 - beta1**step, math.sqrt(1 - beta2**step)
