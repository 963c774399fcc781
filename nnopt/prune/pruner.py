"""``Pruner``: raises the sparsity of a model's layers on a schedule, inside a training loop.

    pruner = Pruner(model, nnopt.prune.l1_unstructured, schedules.cubic(0.0, 0.9, 0, 1000, 100))
    for step in range(n):
        loss.backward(); opt.step(); pruner.step()

Each ``step()`` asks the schedule for the target sparsity at the current step and prunes each tensor (scope
"layer") or all of them together (scope "global", through ``global_unstructured``) from its current sparsity up
to the target, with any pruning method that takes torch.nn.utils.prune's ``(module, name, amount, ...)``
arguments. ``amount`` prunes among the remaining entries, as in torch, so raising a tensor from sparsity ``s``
to ``S`` prunes ``(S - s) / (1 - s)`` of what remains; the known methods get that as an exact count
(entries, or channels along ``dim`` for the structured methods) so the target is met to the entry.
"""

import functools

import torch
from torch.nn.utils import prune as _tp

from nnopt.layers import is_linear_like
from nnopt.prune._contract import current_mask

__all__ = ["Pruner", "prunable", "prune_to", "sparsity_of", "zero_state"]

_UNSTRUCTURED = {"l1_unstructured", "random_unstructured"}
_STRUCTURED = {"ln_structured", "random_structured"}
_SCOPES = ("layer", "global")


def prunable(model):
    """``[(module, "weight")]`` for every linear layer (``nn.Linear`` and transformers' ``Conv1D``, see
    ``nnopt.layers``) and Conv layer of ``model``: what ``Pruner(model, ...)`` prunes."""
    return [(m, "weight") for m in model.modules()
            if (is_linear_like(m) or isinstance(m, torch.nn.modules.conv._ConvNd))
            and isinstance(m._parameters.get("weight"), torch.Tensor)]


def _pairs(model_or_parameters):
    if isinstance(model_or_parameters, torch.nn.Module):
        pairs = prunable(model_or_parameters)
        if not pairs:
            raise ValueError("model_or_parameters: the model has no Linear or Conv layer to prune; "
                             "pass (module, name) pairs instead")
        return pairs
    try:
        items = list(model_or_parameters)
    except TypeError:
        raise TypeError("model_or_parameters must be an nn.Module or an iterable of (module, name) pairs, got "
                        f"{type(model_or_parameters).__name__}") from None
    pairs = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            item = (item, "weight")
        if (not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], torch.nn.Module)
                or not isinstance(item[1], str)):
            raise TypeError(f"model_or_parameters: expected (module, name) pairs, got {item!r}")
        if not hasattr(item[0], item[1]):
            raise AttributeError(f"model_or_parameters: module {type(item[0]).__name__} has no tensor "
                                 f"'{item[1]}'")
        pairs.append(tuple(item))
    if not pairs:
        raise ValueError("model_or_parameters: no (module, name) pairs to prune")
    return pairs


def _unwrap(method):
    """(base function, its partial-bound keyword arguments)."""
    kwargs = {}
    while isinstance(method, functools.partial):
        kwargs = {**method.keywords, **kwargs}
        method = method.func
    return method, kwargs


def _kind(method, kwargs):
    """"unstructured", ("structured", dim) or None (unknown: gets a fraction of the remaining entries)."""
    base, bound = _unwrap(method)
    name = getattr(base, "__name__", "")
    if name in _UNSTRUCTURED:
        return "unstructured"
    if name in _STRUCTURED:
        dim = {**bound, **kwargs}.get("dim", -1)
        return ("structured", dim)
    return None


def _kept_channels(mask, dim):
    dim = dim % mask.dim()
    return mask.transpose(0, dim).reshape(mask.shape[dim], -1).any(1)


def _global_method(method):
    """The torch pruning-method class global_unstructured takes for ``method`` (a function or such a class)."""
    if isinstance(method, type) and issubclass(method, _tp.BasePruningMethod):
        return method
    name = getattr(_unwrap(method)[0], "__name__", "")
    if name == "l1_unstructured":
        return _tp.L1Unstructured
    if name == "random_unstructured":
        return _tp.RandomUnstructured
    raise ValueError(f"scope='global' needs method l1_unstructured, random_unstructured or an unstructured "
                     f"torch.nn.utils.prune.BasePruningMethod subclass, got {method!r}")


def sparsity_of(module, name):
    """Fraction of the entries of ``module.<name>`` its mask prunes (0.0 when it has no mask)."""
    mask = current_mask(module, name)
    return 1.0 - mask.sum().item() / max(1, mask.numel())


def _amount(mask, target, kind):
    """What to pass as ``amount`` to take ``mask`` to ``target`` sparsity, or None when nothing is to prune."""
    if isinstance(kind, tuple):  # structured: count whole channels along dim
        kept = _kept_channels(mask, kind[1])
        units, remaining = kept.numel(), int(kept.sum())
    else:
        units, remaining = mask.numel(), int(mask.sum())
    k = round(target * units) - (units - remaining)
    if k <= 0 or remaining == 0:
        return None
    if kind is None:  # unknown units: the fraction of the remaining entries (S - s) / (1 - s)
        return min(1.0, k / remaining)
    return min(k, remaining)


def prune_to(pairs, method, target, scope="layer", importance_scores=None, **method_kwargs):
    """Raises every ``(module, name)`` of ``pairs`` to ``target`` sparsity (never lowers it).

    scope "layer": each tensor to ``target``; "global": all of them together to ``target`` of their total
    entries, the lowest scores across tensors first. ``importance_scores``: None or a callable
    ``(module, name) -> tensor`` of the tensor's shape.
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    target = float(target)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target sparsity must be in [0, 1], got {target}")
    kind = _kind(method, method_kwargs)
    if scope == "global":
        pruning_method = _global_method(method)
        masks = [current_mask(m, n) for m, n in pairs]
        total = sum(mk.numel() for mk in masks)
        remaining = sum(int(mk.sum()) for mk in masks)
        k = round(target * total) - (total - remaining)
        if k <= 0 or remaining == 0:
            return
        from nnopt.prune.global_ import global_unstructured

        scores = None if importance_scores is None else {(m, n): importance_scores(m, n) for m, n in pairs}
        global_unstructured(pairs, pruning_method=pruning_method, importance_scores=scores,
                            amount=min(k, remaining), **method_kwargs)
        return
    for m, n in pairs:
        amount = _amount(current_mask(m, n), target, kind)
        if amount is None:
            continue
        if importance_scores is not None:
            method(m, n, amount=amount, importance_scores=importance_scores(m, n), **method_kwargs)
        else:
            method(m, n, amount=amount, **method_kwargs)


@torch.no_grad()
def zero_state(optimizer, pairs):
    """Zeroes, in ``optimizer``'s state, the entries of each ``(module, name)``'s pruned positions."""
    for m, n in pairs:
        param = getattr(m, n)
        state = optimizer.state.get(param)
        if not state:
            continue
        pruned = ~current_mask(m, n)
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.shape == param.shape:
                v.masked_fill_(pruned, 0)


class Pruner:
    """Raises sparsity on ``schedule`` each time ``step()`` is called.

    model_or_parameters: an nn.Module (its Linear, Conv1D and Conv weights are pruned) or (module, name) pairs.
    method: a pruning function ``(module, name, amount, ...)`` such as ``nnopt.prune.l1_unstructured`` or
    ``functools.partial(nnopt.prune.ln_structured, n=2, dim=0)``; extra keyword arguments go to it.
    schedule: a callable ``step -> target sparsity`` (``nnopt.prune.schedules``).
    scope: "layer" (each tensor reaches the target) or "global" (the tensors together, via global_unstructured).
    importance_scores: None or a callable ``(module, name) -> tensor``, evaluated at each pruning step.
    optimizer: the torch.optim optimizer training these tensors, if any: each pruning step zeroes its state
    (momentum, Adam's moments) at the newly pruned entries, which would otherwise keep moving them off 0
    (the gradient hook zeroes only gradients; nnopt optimizers apply the mask to their state themselves).
    """

    def __init__(self, model_or_parameters, method, schedule, scope="layer", importance_scores=None,
                 optimizer=None, **method_kwargs):
        if not callable(method):
            raise TypeError(f"method must be a pruning function (module, name, amount, ...), got {method!r}")
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> sparsity, got {schedule!r}")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if scope == "global":
            _global_method(method)
        elif isinstance(method, type):
            raise TypeError(f"method must be a pruning function (module, name, amount, ...), got the class "
                            f"{method.__name__}; torch pruning-method classes are for scope='global'")
        if importance_scores is not None and not callable(importance_scores):
            raise TypeError("importance_scores must be None or a callable (module, name) -> tensor")
        if optimizer is not None and not hasattr(optimizer, "state"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.pairs = _pairs(model_or_parameters)
        self.method, self.schedule, self.scope, self.optimizer = method, schedule, scope, optimizer
        self.importance_scores, self.method_kwargs = importance_scores, method_kwargs
        self.step_count = 0  # the schedule step the next call to step() prunes for
        self.target = 0.0  # the highest target applied so far

    def step(self):
        """Prunes up to the schedule's target at the current step, then advances the step; returns the target."""
        target = float(self.schedule(self.step_count))
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"schedule returned {target} at step {self.step_count}; sparsity must be in [0, 1]")
        # The schedule changes every few steps at most: skip the mask scan while the target stands.
        if target > self.target:
            prune_to(self.pairs, self.method, target, self.scope, self.importance_scores, **self.method_kwargs)
            if self.optimizer is not None:
                zero_state(self.optimizer, self.pairs)
            self.target = target
        self.step_count += 1
        return target

    def sparsity(self):
        """(overall sparsity of the pruned tensors, {index: per-tensor sparsity})."""
        per = {i: sparsity_of(m, n) for i, (m, n) in enumerate(self.pairs)}
        total = sum(getattr(m, n).numel() for m, n in self.pairs)
        pruned = sum(per[i] * getattr(m, n).numel() for i, (m, n) in enumerate(self.pairs))
        return pruned / max(1, total), per

    def state_dict(self):
        """The pruner's progress (the masks themselves live in the model's state_dict)."""
        return {"step_count": self.step_count, "target": self.target, "scope": self.scope,
                "num_tensors": len(self.pairs)}

    def load_state_dict(self, state):
        for key in ("step_count", "target"):
            if key not in state:
                raise KeyError(f"Pruner.load_state_dict: state has no '{key}'")
        if state.get("num_tensors", len(self.pairs)) != len(self.pairs):
            raise ValueError(f"Pruner.load_state_dict: the state was saved for {state['num_tensors']} tensors, "
                             f"this pruner has {len(self.pairs)}")
        if state.get("scope", self.scope) != self.scope:
            raise ValueError(f"Pruner.load_state_dict: the state was saved with scope={state['scope']!r}, "
                             f"this pruner has scope={self.scope!r}")
        self.step_count, self.target = int(state["step_count"]), float(state["target"])

    def __repr__(self):
        name = getattr(_unwrap(self.method)[0], "__name__", repr(self.method))
        return (f"Pruner({len(self.pairs)} tensors, method={name}, schedule={self.schedule!r}, "
                f"scope={self.scope!r}, step={self.step_count})")
