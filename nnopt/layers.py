"""What nnopt treats as a linear layer, in one place: ``nn.Linear`` and transformers' ``Conv1D``.

transformers' ``Conv1D`` (GPT-2 and its family) is a Linear with a transposed weight: ``y = x @ W + b`` with
``W`` of shape ``[in_features, out_features]`` (``nx``, ``nf``). Every entry point that looks for "linear layers"
(pruning, conversion to MaskedLinear, one-shot pruning, growth operators) asks this module, so Conv1D is handled
the same way everywhere, in the input-dimension convention: N:M groups and blocks run along the input features,
whatever the weight's storage order.

transformers is never imported here: a Conv1D is recognised by its class, so ``import nnopt`` stays lean.
"""

import torch

__all__ = ["is_conv1d", "is_linear_like", "linear_modules", "in_dim", "out_dim", "in_out_features",
           "weight_as_linear"]


def is_conv1d(module):
    """True for transformers' ``Conv1D`` (``transformers.pytorch_utils.Conv1D`` or a subclass of it)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def is_linear_like(module):
    """True for ``nn.Linear`` (and subclasses, MaskedLinear included) and transformers' ``Conv1D``."""
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def linear_modules(model):
    """``[(qualified_name, module)]`` for every linear-like layer of ``model``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if is_linear_like(m)]


def in_dim(module):
    """The weight dimension that indexes input features: 1 for ``nn.Linear`` ([out, in]), 0 for Conv1D ([in, out])."""
    return 0 if is_conv1d(module) else 1


def out_dim(module):
    """The weight dimension that indexes output features: 0 for ``nn.Linear``, 1 for Conv1D."""
    return 1 - in_dim(module)


def in_out_features(module):
    """``(in_features, out_features)`` of a linear-like layer."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


def weight_as_linear(module):
    """The weight as ``[out_features, in_features]``: the tensor itself for Linear, a transposed view for Conv1D
    (writes through it land in the parameter)."""
    return module.weight.t() if is_conv1d(module) else module.weight
