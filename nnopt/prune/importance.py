"""Gradient-based importance scores, for ``importance_scores=`` of ``l1_unstructured``, ``ln_structured``,
``block_unstructured`` and ``global_unstructured``.

Removing weight w changes the loss by about ``-g·w`` (first-order Taylor expansion, g = dL/dw), so

- ``weight_grad(module, name)`` = |w·g| from the gradient now in ``.grad`` (one batch);
- ``Taylor(parameters)`` accumulates over batches: call ``update()`` after each backward, then ``scores()``.
  ``squared=True`` (default) averages (w·g)² per batch (Molchanov et al., 2019); ``squared=False`` takes |w·ḡ|
  with ḡ the gradient averaged over the batches.

Scores have the parameter's shape (float32); pruned entries score 0. ``scores()`` and ``weight_grad_scores`` return
the ``{(module, name): tensor}`` dict ``global_unstructured`` takes.
"""

import torch

from nnopt.prune._contract import get_param


def _grad(module, name):
    t = get_param(module, name)
    if t.grad is None:
        raise RuntimeError(f"{name} of {type(module).__name__} has no gradient; run backward() before scoring it")
    return t, t.grad


@torch.no_grad()
def weight_grad(module, name):
    """|w·g| of ``module.<name>`` from its current ``.grad`` (float32, the parameter's shape)."""
    t, g = _grad(module, name)
    return (t.float() * g.float()).abs()


def weight_grad_scores(parameters):
    """``{(module, name): |w·g|}`` for every pair in ``parameters``, ready for ``global_unstructured``."""
    return {(module, name): weight_grad(module, name) for module, name in parameters}


class Taylor:
    """First-order Taylor importance accumulated over batches for ``parameters``, a list of (module, name)."""

    def __init__(self, parameters, squared=True):
        self.parameters = [(module, name) for module, name in parameters]
        for module, name in self.parameters:
            get_param(module, name)
        self.squared = squared
        self.count = 0
        self._sums = [None] * len(self.parameters)

    @torch.no_grad()
    def update(self):
        """Adds the gradients now in ``.grad`` (call after each ``backward()``)."""
        for i, (module, name) in enumerate(self.parameters):
            t, g = _grad(module, name)
            term = (t.float() * g.float()).square() if self.squared else g.float().clone()
            self._sums[i] = term if self._sums[i] is None else self._sums[i].add_(term)
        self.count += 1

    @torch.no_grad()
    def score(self, module, name):
        """The accumulated importance of ``module.<name>``."""
        if self.count == 0:
            raise RuntimeError("Taylor.score: call update() after a backward pass first")
        for i, (m, n) in enumerate(self.parameters):
            if m is module and n == name:
                mean = self._sums[i] / self.count
                return mean if self.squared else (get_param(m, n).float() * mean).abs()
        raise KeyError(f"{name} of {type(module).__name__} is not one of the scored parameters")

    def scores(self):
        """``{(module, name): score}`` for every scored parameter."""
        return {(m, n): self.score(m, n) for m, n in self.parameters}

    def reset(self):
        """Forgets the accumulated batches."""
        self.count, self._sums = 0, [None] * len(self.parameters)
