"""The mask contract every nnopt pruning method shares.

A pruned parameter ``module.<name>`` keeps being the module's own ``nn.Parameter`` and holds exact zeros at
pruned entries; a bool buffer ``module.<name>_mask`` (True = kept) sits beside it and is the parameter's mask in
the registry (``nnopt.sparsity``), so nnopt optimizers and layers apply it inside their kernels. For any other
optimizer a gradient hook zeroes the pruned entries of the gradient. Forward runs at dense speed: no hook
recomputes the weight. A gradient hook alone cannot hold the zeros under an optimizer with momentum or weight
decay (its state moves a pruned entry again), so after each step of a torch.optim optimizer a global step hook
re-zeroes the pruned entries of that optimizer's masked parameters; nnopt optimizers do it in their kernels.

Copies: ``copy.deepcopy`` and pickling copy the buffers and the module's ``_MaskLink`` forward pre-hook, but
not the per-tensor registry attribute or gradient hook; the link re-attaches them on the first forward of the
copy (an identity check per pruned tensor otherwise), and ``relink(model)`` does it at once.
"""

import weakref

import torch

from nnopt import sparsity

MASK_SUFFIX = "_mask"


class _MaskLink:
    """Forward pre-hook that keeps each pruned tensor of its module linked to its mask buffer."""

    def __init__(self):
        self.names = []
        self.handles = {}  # name -> gradient-hook handle; not copied or pickled (the copy relinks itself)
        # name -> (weakref to the parameter, weakref to the mask, requires_grad) as last linked: an unchanged
        # pair skips link()'s lookups (~10 us of a ~200 us decode-shaped call).
        self.linked = {}

    def __call__(self, module, args):
        if torch.compiler.is_compiling():  # bookkeeping only (done eagerly by apply_mask): nothing to trace
            return
        params, buffers = module._parameters, module._buffers
        for name in self.names:
            param, mask = params.get(name), buffers.get(name + MASK_SUFFIX)
            last = self.linked.get(name)
            if (last is not None and param is not None and last[0]() is param and last[1]() is mask
                    and last[2] == param.requires_grad and sparsity.get_mask(param) is mask):
                continue
            link(module, name)
            if param is not None and mask is not None:
                self.linked[name] = (weakref.ref(param), weakref.ref(mask), param.requires_grad)

    def __getstate__(self):
        return {"names": list(self.names)}

    def __setstate__(self, state):
        self.names, self.handles, self.linked = state["names"], {}, {}


_STEP_HOOK = None


def _rezero_after_step(optimizer, args, kwargs):
    from nnopt.optim._fused import FusedOptimizer

    if isinstance(optimizer, FusedOptimizer):
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                mask = sparsity.get_mask(p)
                if mask is not None:
                    sparsity.zero_pruned_(p, mask)


def _ensure_step_hook():
    global _STEP_HOOK
    if _STEP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK = register_optimizer_step_post_hook(_rezero_after_step)


class _ZeroAfterLoad:
    """load_state_dict post-hook: a loaded weight (dense pretrained weights, a rewind) is pruned again at once."""

    def __call__(self, module, incompatible_keys):
        with torch.no_grad():
            for name in pruned_names(module):
                sparsity.zero_pruned_(getattr(module, name), module._buffers[name + MASK_SUFFIX])


# Layers whose class sets ``_nnopt_links_in_forward`` (MaskedLinear, MaskedConv1D) keep their _MaskLink under this
# attribute and call it at the top of their forward, instead of as a forward pre-hook: any hook sends every call
# through nn.Module's slow dispatch (~10 us, a visible share of a decode-shaped call).
_LINK_ATTR = "_nnopt_mask_link"


def _link_of(module):
    hook = module.__dict__.get(_LINK_ATTR)
    if hook is not None:
        return hook
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _MaskLink):
            return hook
    return None


def _zero_pruned_grad(grad, module, name):
    mask = module._buffers.get(name + MASK_SUFFIX)
    if mask is None:
        return grad
    if grad.layout == torch.sparse_coo:  # nn.Embedding(sparse=True): mask the values of the rows it touches
        grad = grad.coalesce()
        idx = grad.indices()
        keep = mask[tuple(idx)]  # [nnz, *trailing dims of the sparse part's values]
        values = torch.where(keep, grad.values(), grad.values().new_zeros(()))
        return torch.sparse_coo_tensor(idx, values, grad.shape, is_coalesced=True, check_invariants=False)
    return torch.where(mask, grad, grad.new_zeros(()))  # one pass, no ~mask temporary


def _is_dtensor(t):
    import sys

    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # only once torch loaded it
    return dtensor is not None and isinstance(t, dtensor)


def link(module, name):
    """(Re)attaches the registry entry and the gradient hook of ``module.<name>`` to its mask buffer."""
    param = getattr(module, name)
    mask = module._buffers[name + MASK_SUFFIX]
    if _is_dtensor(mask) and not _is_dtensor(param):
        return  # FSDP2's forward: the module holds the gathered full parameter; the DTensor one stays linked
    _ensure_step_hook()
    hook = _link_of(module)
    if getattr(module, "_nnopt_masks_own_grad", False):  # the layer's backward masks the gradient (MaskedLinear)
        hook = None
    if sparsity.get_mask(param) is not mask or (hook is not None and param.requires_grad and name not in hook.handles):
        sparsity.set_mask(param, mask)
        if hook is not None and param.requires_grad:
            old = hook.handles.pop(name, None)
            if old is not None:
                old.remove()
            hook.handles[name] = param.register_hook(lambda g, m=module, n=name: _zero_pruned_grad(g, m, n))


def get_param(module, name):
    """``module.<name>`` as a floating-point tensor; the errors torch.nn.utils.prune raises otherwise."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in module._parameters and name not in module._buffers:
        raise AttributeError(f"Parameter '{name}' of module {type(module).__name__} has to be pruned "
                             "but it does not exist")
    t = getattr(module, name)
    if not (t.is_floating_point()):
        raise TypeError(f"Parameter '{name}' of module {type(module).__name__} has dtype {t.dtype}; "
                        "only floating-point tensors can be pruned")
    return t


def current_mask(module, name):
    """The bool mask of ``module.<name>`` (all True when it is not pruned yet)."""
    mask = module._buffers.get(name + MASK_SUFFIX)
    return mask if mask is not None else torch.ones_like(getattr(module, name), dtype=torch.bool)


@torch.no_grad()
def apply_mask(module, name, mask, copy=True):
    """Prunes ``module.<name>`` to ``mask`` (bool, True = kept): zeroes pruned entries, stores the buffer, links.

    ``copy=False`` lets a fresh mask become the buffer itself (no second copy of a large mask)."""
    t = get_param(module, name)
    mask = mask.to(device=t.device, dtype=torch.bool)
    if mask.shape != t.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from {name}'s shape {tuple(t.shape)}")
    key = name + MASK_SUFFIX
    if key in module._buffers:
        if module._buffers[key] is not mask:
            module._buffers[key].copy_(mask)  # in place: optimizers and layers holding the mask see the change
    else:
        module.register_buffer(key, mask.clone() if copy else mask)
    sparsity.zero_pruned_(t, module._buffers[key])
    hook = _link_of(module)
    if hook is None:
        hook = _MaskLink()
        if getattr(type(module), "_nnopt_links_in_forward", False):
            module.__dict__[_LINK_ATTR] = hook
        else:
            module.register_forward_pre_hook(hook)
        module.register_load_state_dict_post_hook(_ZeroAfterLoad())
    if name not in hook.names:
        hook.names.append(name)
    link(module, name)
    return module


def remove_mask(module, name):
    """Makes the pruning of ``module.<name>`` permanent: zeros stay, the mask buffer, hook and link go."""
    key = name + MASK_SUFFIX
    if key not in module._buffers:
        raise ValueError(f"Parameter '{name}' of module {type(module).__name__} has to be pruned before "
                         "pruning can be removed")
    param = getattr(module, name)
    del module._buffers[key]
    sparsity.clear_mask(param)
    hook = _link_of(module)
    if hook is not None:
        handle = hook.handles.pop(name, None)
        if handle is not None:
            handle.remove()
        if name in hook.names:
            hook.names.remove(name)
        hook.linked.pop(name, None)
    return module


def pruned_names(module):
    """Names of the tensors of ``module`` (not its children) pruned under this contract."""
    hook = _link_of(module)
    return list(hook.names) if hook is not None else []


def relink(model):
    """Re-attaches every pruned tensor of ``model`` to its mask (done lazily by the first forward anyway)."""
    for module in model.modules():
        for name in pruned_names(module):
            link(module, name)
    return model
