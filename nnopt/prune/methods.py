"""torch.nn.utils.prune's functions on nnopt's mask contract.

Same names, signatures and ``amount`` semantics as torch.nn.utils.prune: ``amount`` is a fraction in [0, 1] of
the entries (channels) still unpruned, rounded to the nearest count, or a non-negative int count of them; pruning
a pruned tensor again prunes among its remaining entries (channels). Masks are computed by torch's own pruning
method classes (and ``PruningContainer`` for repeated pruning), so the deterministic methods give exactly torch's
masks, and the random ones draw the same random numbers. Only the application differs: instead of torch's
``<name>_orig`` parameter and a forward hook that multiplies by the mask on every call, the parameter itself holds
zeros at pruned entries and a bool ``<name>_mask`` buffer sits beside it (see ``_contract.py``).

Bad input raises what torch raises (ValueError for an amount out of range or larger than the remaining count,
TypeError for an amount of the wrong type or a non-floating tensor, AttributeError for an unknown name,
IndexError for a bad ``dim``, AssertionError for an ``importance_scores`` or ``mask`` of the wrong shape), and
every check runs before the module is touched, so a failed call leaves it unchanged.
"""

import numbers

import torch
from torch.nn.utils import prune as _tp

from nnopt.prune._contract import MASK_SUFFIX, apply_mask, current_mask, get_param, pruned_names, remove_mask


def check_amount(amount):
    """torch's check of ``amount`` (ValueError out of range, TypeError otherwise), with bool refused too."""
    if isinstance(amount, bool):
        raise TypeError(f"amount={amount} is a bool; it must be an int count or a float fraction in [0, 1]")
    _tp._validate_pruning_amount_init(amount)


def check_dim(t, dim, arg="dim"):
    """IndexError (torch's type) naming ``dim`` when it does not index a dimension of ``t``."""
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool):
        raise TypeError(f"{arg} must be an int, got {type(dim).__name__}")
    if not -t.dim() <= dim < t.dim():
        raise IndexError(f"{arg}={dim} is out of range for a tensor of shape {tuple(t.shape)}")


def scores_for(module, name, t, importance_scores):
    """The tensor a criterion ranks: ``importance_scores`` (same shape as ``t``, AssertionError as torch) or ``t``."""
    if importance_scores is None:
        return t.detach()
    if not isinstance(importance_scores, torch.Tensor) or importance_scores.shape != t.shape:
        shape = getattr(importance_scores, "shape", type(importance_scores).__name__)
        raise AssertionError(f"importance_scores should have the same shape as parameter {name} of "
                             f"{type(module).__name__}, got {shape} vs {tuple(t.shape)}")
    return importance_scores.detach().to(t.device)


@torch.no_grad()
def compute_mask(module, name, method, importance_scores=None):
    """The bool mask torch's ``method`` (a BasePruningMethod instance) gives ``module.<name>``, pruned or not.

    A first pruning calls ``method.compute_mask`` on a mask of ones, a repeated one goes through a
    ``PruningContainer`` over the current mask, exactly as torch's ``BasePruningMethod.apply`` does.
    """
    t = get_param(module, name)
    # torch's methods index their mask through .view(-1), which fails on a channels_last (non-contiguous) weight;
    # the mask is computed in the contiguous order instead (unchanged for a contiguous weight: same masks, same
    # random numbers as torch) and comes back in the weight's shape.
    scores = scores_for(module, name, t, importance_scores).contiguous()
    method._tensor_name = name
    if name + MASK_SUFFIX in module._buffers:
        container = _tp.PruningContainer()
        container._tensor_name = name
        container.add_pruning_method(method)
        mask = container.compute_mask(scores, module._buffers[name + MASK_SUFFIX].to(scores.dtype).contiguous())
    else:
        mask = method.compute_mask(scores, torch.ones_like(scores, memory_format=torch.contiguous_format))
    return mask != 0


def identity(module, name):
    """Marks ``module.<name>`` pruned with a mask of ones (keeps the current mask if it is pruned already)."""
    get_param(module, name)
    return apply_mask(module, name, current_mask(module, name).clone())


def random_unstructured(module, name, amount):
    """Prunes ``amount`` of the remaining entries of ``module.<name>``, chosen uniformly at random."""
    check_amount(amount)
    return apply_mask(module, name, compute_mask(module, name, _tp.RandomUnstructured(amount)))


def l1_unstructured(module, name, amount, importance_scores=None):
    """Prunes the ``amount`` remaining entries of ``module.<name>`` with the smallest |importance_scores|
    (default: |weight|)."""
    check_amount(amount)
    return apply_mask(module, name, compute_mask(module, name, _tp.L1Unstructured(amount), importance_scores))


def random_structured(module, name, amount, dim):
    """Prunes ``amount`` of the remaining channels along ``dim`` of ``module.<name>`` at random."""
    check_amount(amount)
    t = get_param(module, name)
    _tp._validate_structured_pruning(t)
    check_dim(t, dim)
    return apply_mask(module, name, compute_mask(module, name, _tp.RandomStructured(amount, dim)))


def ln_structured(module, name, amount, n, dim, importance_scores=None):
    """Prunes the ``amount`` remaining channels along ``dim`` of ``module.<name>`` with the smallest L``n`` norm
    (``n`` as torch.norm's ``p``: 1, 2, inf, -inf, 'fro', ...)."""
    check_amount(amount)
    t = get_param(module, name)
    _tp._validate_structured_pruning(t)
    check_dim(t, dim)
    method = _tp.LnStructured(amount, n, dim)
    return apply_mask(module, name, compute_mask(module, name, method, importance_scores))


def custom_from_mask(module, name, mask):
    """Prunes ``module.<name>`` where ``mask`` is 0 (False), on top of any earlier pruning.

    Unlike torch, a non-binary mask does not scale the weight: every nonzero entry counts as kept.
    """
    t = get_param(module, name)
    mask = torch.as_tensor(mask, device=t.device)
    if mask.shape != t.shape:
        raise AssertionError(f"mask shape {tuple(mask.shape)} must match the shape {tuple(t.shape)} of "
                             f"parameter {name} of {type(module).__name__}")
    return apply_mask(module, name, current_mask(module, name) & (mask != 0))


def _torch_hook(module, name):
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, _tp.BasePruningMethod) and hook._tensor_name == name:
            return key, hook
    return None, None


def remove(module, name):
    """Makes the pruning of ``module.<name>`` permanent: zeros stay, the mask and its link go.

    Also removes torch.nn.utils.prune's reparametrisation from a tensor pruned by torch. ValueError (as torch)
    when the tensor is not pruned.
    """
    if name in pruned_names(module):
        return remove_mask(module, name)
    key, hook = _torch_hook(module, name)
    if hook is not None:
        hook.remove(module)
        del module._forward_pre_hooks[key]
        return module
    raise ValueError(f"Parameter '{name}' of module {type(module).__name__} has to be pruned before pruning "
                     "can be removed")


def is_pruned(module):
    """True when ``module`` or any submodule holds a pruned tensor (nnopt's contract or torch's hooks)."""
    for sub in module.modules():
        if pruned_names(sub) or any(isinstance(h, _tp.BasePruningMethod) for h in sub._forward_pre_hooks.values()):
            return True
    return False
