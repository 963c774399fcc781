"""nnopt.optim.NAdam: torch.optim.NAdam's arguments and math, fused into one kernel call per group."""

import torch

from nnopt.optim._fused import FusedOptimizer, _as_float, check_nonneg
from nnopt.optim._validate import check_betas, check_lr
from nnopt.reference.fused_optim import nadam_scalars


class _MuProducts:
    """The mu_product states of one kernel call (parameters sharing a step count and a mu_product): one float32
    storage, each ``state["mu_product"]`` a 0-dim view of its element, so one ``mul_`` advances them all (on the
    device, next to device step counts, when the kernel reads the count there)."""

    def __init__(self, storage, count):
        self.storage, self.count = storage, count  # count: (one-element step view, read on the device) or None


class NAdam(FusedOptimizer):
    """NAdam, as ``torch.optim.NAdam`` (momentum_decay, decoupled_weight_decay for NAdamW).

    Extra arguments: ``backend=``, ``master_weights=``, ``l1=``. State per parameter, as in torch: ``step``,
    ``mu_product`` (float32 0-dim tensors), ``exp_avg``, ``exp_avg_sq``.
    """

    _op = "nadam_step"
    _kernel_takes_step = True

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, backend=None, master_weights=False, l1=0.0):
        check_lr(lr)
        check_nonneg(eps, "epsilon value")
        check_betas(betas)
        check_nonneg(weight_decay, "weight_decay value")
        check_nonneg(momentum_decay, "momentum_decay value")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1,
                         differentiable=differentiable, capturable=capturable)

    def _group_defaults(self):
        return dict(super()._group_defaults(), decoupled_weight_decay=False)

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if "mu_product" not in state:
            state["mu_product"] = torch.tensor(1.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("exp_avg", "exp_avg_sq")

    def _bucket_extra(self, group, state):
        return float(state["mu_product"])  # read when a plan is built only; one kernel call shares one value

    def _build_plan(self, gi, group, grads, has):
        plan = super()._build_plan(gi, group, grads, has)
        if plan is None:
            return None
        params = group["params"]
        for b in plan.buckets:
            device = b.count[0].device if b.count is not None else torch.device("cpu")
            storage = torch.full((len(b.idx),), b.extra, dtype=torch.float32, device=device)
            for j, i in enumerate(b.idx):
                self.state[params[i]]["mu_product"] = storage[j]
            b.extra = _MuProducts(storage, b.count)
        return plan

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch's loader casts mu_product to the parameter's dtype and device
            if isinstance(st.get("mu_product"), torch.Tensor):
                st["mu_product"] = st["mu_product"].detach().to("cpu", torch.float32)

    def _hyper(self, group, step, mus):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        md = float(group["momentum_decay"])
        bc2, mu, mu_next = nadam_scalars(beta1, beta2, md, step)
        hyper = dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                     decoupled=bool(group["decoupled_weight_decay"]), maximize=bool(group["maximize"]),
                     momentum_decay=md, bias_correction2=bc2, mu=mu, mu_next=mu_next, mu_product=1.0)
        if mus.count is not None and mus.count[1]:
            # Device counts: mu from the count on the device (its formula in float64), not advanced when
            # GradScaler found an inf; the kernel reads the product there.
            count = mus.count[0].to(torch.float64)
            mu_t = beta1 * (1.0 - 0.5 * torch.pow(0.96, count * md))
            found_inf = getattr(self, "found_inf", None)
            if found_inf is not None:
                mu_t = torch.where(found_inf.to(mu_t.device).reshape(1) != 0, 1.0, mu_t)
            mus.storage.mul_(mu_t)
            hyper["mu_product_tensor"] = mus.storage[:1]
        else:  # host counts (CPU parameters): step() has returned already when found_inf was set
            mus.storage.mul_(mu)
            hyper["mu_product"] = float(mus.storage[0])
        return hyper
