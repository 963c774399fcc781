"""Loads the C++/CUDA extension nnopt._C on first use and registers the fake kernels that torch.compile traces.

Nothing here runs at `import nnopt`: the extension is loaded by `load()` (called by the backend registry).
"""

import functools
import types

import torch

# Every op's name in the `nnopt` library, by family; the schemas live in csrc/ops.cpp.
OPS = {
    "fused_optim": ("sgd_step", "adam_step", "adagrad_step", "rmsprop_step", "nadam_step", "radam_step", "adamax_step",
                    "lion_step", "lamb_step", "adafactor_step", "muon_momentum",
                    "muon_update", "l2_norms"),
    "select": ("select_histogram",),
    "masked_linear": ("masked_linear", "masked_linear_dx", "masked_linear_dw", "masked_linear_pack",
                      "masked_linear_packed"),
    "distill_loss": ("distill_loss_fwd",),
    "oneshot": ("sparsegpt_block", "hessian_accumulate"),
    "quant_optim": ("quant_step",),
}
# Ops that mutate their first arguments carry torch's trailing underscore; the others return a new tensor.
_INPLACE = {"fused_optim", "select", "oneshot", "quant_optim"}
_FUNCTIONAL = {"l2_norms"}  # ops of an in-place family that return a new tensor


@functools.lru_cache(maxsize=None)
def load():
    """Imports nnopt._C. Returns None on success, else the sentence saying why it is unavailable."""
    try:
        from nnopt import _C  # noqa: F401
    except ImportError as e:
        return f"the C++ extension nnopt._C is not built ({e}); run `pip install --no-build-isolation -e .`"
    _register_fakes()
    return None


def op_name(family):
    """The registered name of ``family``'s first op (the one availability checks look up)."""
    name = OPS[family][0]
    return f"{name}_" if family in _INPLACE else name


def has_kernel(op, dispatch_key):
    """True when nnopt::<op> has an implementation for dispatch_key ("CPU" or "CUDA")."""
    if load() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nnopt::{op}", dispatch_key)


def _register_fakes():
    # The fused optimizer steps mutate their inputs and return nothing: their fake kernels do nothing.
    for name in OPS["fused_optim"]:
        if name not in _FUNCTIONAL:
            torch.library.register_fake(f"nnopt::{name}_")(_noop)
    torch.library.register_fake("nnopt::l2_norms")(lambda tensors: tensors[0].new_empty((len(tensors),),
                                                                                         dtype=torch.float32))

    def kept_gather(mask, srcs):  # as many entries as the mask keeps: a data-dependent size
        k = torch.library.get_ctx().new_dynamic_size()
        return [s.new_empty((k,)) for s in srcs]

    torch.library.register_fake("nnopt::kept_gather")(kept_gather)
    torch.library.register_fake("nnopt::kept_scatter_")(_noop)
    # The select histogram adds into its `hist` argument in place and returns nothing.
    torch.library.register_fake("nnopt::select_histogram_")(_noop)
    # SparseGPT's column-block update works in place on its w, pruned and err arguments.
    torch.library.register_fake("nnopt::sparsegpt_block_")(_noop)
    torch.library.register_fake("nnopt::hessian_accumulate_")(_noop)
    torch.library.register_fake("nnopt::quant_step_")(_noop)
    # The masked linear products allocate their results: the fakes give shape, dtype and device.
    torch.library.register_fake("nnopt::masked_linear")(
        lambda x, weight, mask, bias, row_ptr, col_idx, full, block_n, block_k: x.new_empty(
            (x.shape[0], weight.shape[0])))
    torch.library.register_fake("nnopt::masked_linear_dx")(
        lambda dy, weight, mask, col_ptr, row_idx, t_perm, full, block_n, block_k: dy.new_empty(
            (dy.shape[0], weight.shape[1])))
    torch.library.register_fake("nnopt::masked_linear_dw")(
        lambda dy, x, mask, row_ptr, col_idx, full, block_n, block_k: x.new_empty((dy.shape[1], x.shape[1])))
    torch.library.register_fake("nnopt::masked_linear_pack")(_masked_linear_pack_fake)
    torch.library.register_fake("nnopt::masked_linear_packed")(
        lambda x, packed, bias, row_ptr, col_idx, out_features, block_n, block_k: x.new_empty(
            (x.shape[0], out_features)))
    # The distillation loss returns (loss: 0-dim or [B] for "none", grad: like student or empty).
    torch.library.register_fake("nnopt::distill_loss_fwd")(_distill_loss_fake)


def _masked_linear_pack_fake(weight, mask, row_ptr, col_idx, full, block_n, block_k, dtype=None):
    # One panel per listed tile: block_n rounded up to 16 by block_k rounded up to 4 (csrc/cpu/masked_gemv.cpp).
    panel = -(-block_n // 16) * 16 * (-(-block_k // 4) * 4)
    return weight.new_empty((col_idx.shape[0] * panel,), dtype=dtype or weight.dtype)


def _noop(*args, **kwargs):
    return None


def _distill_loss_fake(student, teacher, target, *, temperature, alpha, kind, beta, scale, ignore_index, reduction,
                       need_grad=True):
    loss = student.new_empty((student.shape[0],) if reduction == "none" else ())
    return loss, student.new_empty(student.shape if need_grad else (0,))


@functools.lru_cache(maxsize=None)
def namespace(family):
    """The family's functions, with the same names and signatures as nnopt.reference.<family>, calling nnopt._C."""
    if family == "masked_linear":
        return _masked_linear_namespace()
    if family == "quant_optim":
        return types.SimpleNamespace(quant_step=_quant_step)
    ops = {}
    for name in OPS[family]:
        ops[name] = getattr(torch.ops.nnopt, f"{name}_" if family in _INPLACE and name not in _FUNCTIONAL else name)
    return types.SimpleNamespace(**ops)


def _masked_linear_namespace():
    """The registered masked linear ops behind nnopt.reference.masked_linear's signatures (layout: BlockLayout)."""
    ops = torch.ops.nnopt

    def masked_linear(x, weight, mask, bias, layout):
        return ops.masked_linear(x, weight, mask, bias, layout.row_ptr, layout.col_idx, layout.full,
                                 layout.block_n, layout.block_k)

    def masked_linear_dx(dy, weight, mask, layout):
        return ops.masked_linear_dx(dy, weight, mask, layout.col_ptr, layout.row_idx, layout.t_perm, layout.full,
                                    layout.block_n, layout.block_k)

    def masked_linear_dw(dy, x, mask, layout):
        return ops.masked_linear_dw(dy, x, mask, layout.row_ptr, layout.col_idx, layout.full, layout.block_n,
                                    layout.block_k)

    return types.SimpleNamespace(masked_linear=masked_linear, masked_linear_dx=masked_linear_dx,
                                 masked_linear_dw=masked_linear_dw)


# The float and bool arguments of each fused_optim step, in the order nnopt::quant_step_ takes them.
_QUANT_ARGS = {
    "adam_step": (("lr", "beta1", "beta2", "eps", "weight_decay", "l1", "bias_correction1", "bias_correction2_sqrt"),
                  ("decoupled", "amsgrad", "maximize")),
    "sgd_step": (("lr", "momentum", "dampening", "weight_decay", "l1"), ("nesterov", "maximize", "first_step")),
    "adagrad_step": (("lr", "weight_decay", "eps", "l1", "lr_decay_denom", "lr_decay"), ("maximize",)),
    "rmsprop_step": (("lr", "alpha", "eps", "weight_decay", "momentum", "l1"), ("centered", "maximize")),
}


def _quant_step(op, params, grads, states, scales, masters, masks, *, bits, block_size, seed=-1, lr_tensor=None,
                grad_scale=None, found_inf=None, step=None, **hyper):
    """nnopt.reference.quant_optim.quant_step's signature over nnopt::quant_step_."""
    from nnopt.reference import quant_optim

    floats, bools = _QUANT_ARGS[op]
    defaults = {"lr_decay": 0.0}
    h = [float(hyper.get(k, defaults.get(k))) for k in floats]
    f = [int(bool(hyper[k])) for k in bools]
    device = params[0].device if params else torch.device("cpu")
    if bits in (8, 4):
        qmap, mids = quant_optim.tables(bits, device)
    else:
        qmap = mids = torch.empty(0, device=device)
    st = list(states) + [[]] * (3 - len(states))
    sc = list(scales) + [[]] * (3 - len(scales)) if bits in (8, 4) else [[], [], []]
    torch.ops.nnopt.quant_step_(op, params, grads, st[0], st[1], st[2], sc[0], sc[1], sc[2], masters, masks, qmap,
                                mids, bits=bits, block_size=block_size, hyper=h, flags=f,
                                seed=seed, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, step=step)
