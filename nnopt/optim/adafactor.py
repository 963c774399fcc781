"""nnopt.optim.Adafactor: torch.optim.Adafactor's arguments, math and state on nnopt's fused backends: per group one
kernel call over every parameter, whose launches reduce the statistics of all tensors at once (see the
``adafactor_step`` op in csrc/ops.cpp)."""

import torch

from nnopt.optim._fused import FusedOptimizer


class Adafactor(FusedOptimizer):
    """Adafactor, as ``torch.optim.Adafactor``: factored second moments (``row_var`` [..., R, 1], ``col_var``
    [..., 1, C]) for parameters of 2 or more dimensions, a full ``variance`` otherwise; the step-dependent
    beta2 (``step**beta2_decay``) and relative step size (``min(lr, step**-0.5)`` times ``max(eps2, RMS(p))``);
    the update clipped to RMS ``d``; decoupled weight decay; maximize.

    Per group one backend call updates every parameter: a reduction launch (each tensor's ||p||, the row and
    column sums of g² of the factored ones), a launch reducing each tensor's ||update||, then the update launch;
    the per-tensor scalars never leave the device. Extra arguments: ``backend=``, ``master_weights=`` (bf16/fp16
    parameters with fp32 masters and fp32 states), ``l1=`` (proximal L1 after the update, threshold lr*l1).
    Masks (nnopt.sparsity): masked entries of the parameter, its gradient, its update and its ``variance`` are
    exactly 0 (``row_var``/``col_var`` hold the statistics of the unmasked entries). GradScaler: gradients
    unscaled in-kernel; a step with an inf/NaN changes nothing, with no host read for device parameters.
    State per parameter, as torch: ``step`` (float32), ``row_var``/``col_var`` or ``variance``: checkpoints move
    both ways. With ``eps=(None, ...)``, eps1 is the machine epsilon of the states' dtype (fp32 with masters).
    """

    _op = "adafactor_step"
    _kernel_takes_step = True

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
                 foreach=None, maximize=False, backend=None, master_weights=False, l1=0.0):
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
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights, l1=l1)
        for group in self.param_groups:
            group["foreach"] = foreach

    def _validate(self, gi, i, p, g):
        if torch.is_complex(p):
            raise RuntimeError("Adafactor does not support complex parameters")
        if g.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients")
        super()._validate(gi, i, p, g)

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        dtype = self._state_dtype(p, group)
        if p.dim() > 1:
            if "row_var" not in state:
                state["row_var"] = p.new_zeros(p.shape[:-1] + (1,), dtype=dtype)
            if "col_var" not in state:
                state["col_var"] = p.new_zeros(p.shape[:-2] + (1, p.shape[-1]), dtype=dtype)
        elif "variance" not in state:
            state["variance"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _state_lists(self, group):
        return ("row_var", "col_var")

    def _state_tensor(self, p, name):
        """A parameter of fewer than 2 dims passes its ``variance`` as its row_var and an empty col_var."""
        if p.dim() > 1:
            return self.state[p][name]
        st = self.state[p]
        return st["variance"] if name == "row_var" else st["variance"].new_empty(0)

    def _bucket_extra(self, group, state):
        return next(v.dtype for k, v in state.items() if k != "step")  # eps1's default is the states' epsilon

    def _hyper(self, group, step, dtype):
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(dtype).eps if eps1 is None else eps1
        return dict(beta2_decay=float(group["beta2_decay"]), eps1=float(eps1), eps2=float(eps2), d=float(group["d"]),
                    weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
                    step_count=float(step))
