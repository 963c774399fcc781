"""``iterative``: prune → retrain → evaluate rounds up to a target sparsity, stopping before the metric breaks.

Round ``r`` of ``rounds`` raises the sparsity to ``1 - (1 - target) ** (r / rounds)`` (the same fraction of the
remaining weights each round, as in iterative magnitude pruning), optionally rewinds the surviving weights to a
snapshot (lottery-ticket rewinding; the mask is kept), calls ``train_fn(model)`` and then ``eval_fn(model)``.
When the metric has dropped more than ``max_drop`` below the dense model's, the loop stops and the model goes
back — weights, masks, buffers — to the last round that was within bounds.
"""

import time

import torch

from nnopt.prune._contract import MASK_SUFFIX, apply_mask, pruned_names, remove_mask
from nnopt.prune.pruner import _pairs, prune_to

__all__ = ["History", "iterative"]


class History(list):
    """One dict per round: round, sparsity, metric, seconds, kept (round 0 is the model as given)."""

    @property
    def best(self):
        """The last kept round: the state the model is left in."""
        return [h for h in self if h["kept"]][-1]

    def __str__(self):
        restored = f"no (restored round {self.best['round']})"
        lines = [f"{'round':>5s} {'sparsity':>8s} {'metric':>8s} {'seconds':>8s}  kept"]
        lines += [f"{h['round']:5d} {h['sparsity']:8.4f} {h['metric']:8.4f} {h['seconds']:8.2f}  "
                  f"{'yes' if h['kept'] else restored}" for h in self]
        return "\n".join(lines)


def _sparsity(pairs):
    total = sum(getattr(m, n).numel() for m, n in pairs)
    pruned = sum(int((~m._buffers[n + MASK_SUFFIX]).sum()) for m, n in pairs if n + MASK_SUFFIX in m._buffers)
    return pruned / max(1, total)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mask_key(names, module, name):
    prefix = names[id(module)]
    return f"{prefix}.{name}{MASK_SUFFIX}" if prefix else f"{name}{MASK_SUFFIX}"


@torch.no_grad()
def _restore(model, pairs, names, state):
    """Puts ``model`` back to ``state`` (a _snapshot), masks included: pruned then or not."""
    for m, n in pairs:
        key = _mask_key(names, m, n)
        if key in state:
            apply_mask(m, n, state[key])
        elif n in pruned_names(m):
            remove_mask(m, n)
    model.load_state_dict(state)


@torch.no_grad()
def _rewind(model, snapshot):
    """Copies the snapshot's parameters and buffers (not masks) into ``model``, then re-zeroes pruned entries."""
    own = model.state_dict()
    for k, v in snapshot.items():
        if k.endswith(MASK_SUFFIX) or k not in own:
            continue
        if own[k].shape != v.shape:
            raise ValueError(f"rewind_to: {k} has shape {tuple(v.shape)}, the model's has {tuple(own[k].shape)}")
        own[k].copy_(v)
    for module in model.modules():
        for n in pruned_names(module):
            getattr(module, n).masked_fill_(~module._buffers[n + MASK_SUFFIX], 0)


def iterative(model, train_fn, eval_fn, target, rounds, max_drop, method=None, rewind_to=None, scope="global",
              parameters=None, higher_is_better=True, **method_kwargs):
    """Prunes ``model`` to ``target`` sparsity in ``rounds`` prune → retrain → evaluate rounds; returns a History.

    train_fn(model): retrains after each pruning step (its optimizer should be made inside, or be an nnopt
    optimizer: the masks keep pruned entries at 0 under any optimizer). eval_fn(model) -> float: the metric,
    higher is better unless ``higher_is_better=False``. max_drop: the largest tolerated drop of the metric
    below the model as given (round 0); a round beyond it ends the loop and the model returns to the last good
    round. method: a pruning function (default ``l1_unstructured``), scope: "global" (default) or "layer", as in
    ``Pruner``; parameters: (module, name) pairs (default: every Linear and Conv weight). rewind_to: None, "start"
    (the weights as given) or a ``model.state_dict()`` saved earlier in training: after each pruning step the
    surviving weights (and buffers) are reset to it, keeping the mask (lottery-ticket rewinding).
    """
    if not callable(train_fn) or not callable(eval_fn):
        raise TypeError("train_fn and eval_fn must be callables taking the model")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"target must be a sparsity in [0, 1), got {target!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or max_drop < 0:
        raise ValueError(f"max_drop must be a number >= 0, got {max_drop!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if method is None:
        from nnopt.prune.methods import l1_unstructured as method
    pairs = _pairs(model if parameters is None else parameters)
    names = {id(m): name for name, m in model.named_modules()}
    for m, _ in pairs:
        if id(m) not in names:
            raise ValueError("parameters: every (module, name) pair must belong to model")
    if isinstance(rewind_to, str):
        if rewind_to != "start":
            raise ValueError(f"rewind_to must be None, 'start' or a state_dict, got {rewind_to!r}")
        rewind_to = _snapshot(model)
    elif rewind_to is not None:
        if not hasattr(rewind_to, "items"):
            raise TypeError(f"rewind_to must be None, 'start' or a state_dict, got {type(rewind_to).__name__}")
        rewind_to = {k: v.detach().clone() for k, v in rewind_to.items()}

    sign = 1.0 if higher_is_better else -1.0
    t0 = time.perf_counter()
    baseline = float(eval_fn(model))
    history = History([{"round": 0, "sparsity": _sparsity(pairs), "metric": baseline,
                        "seconds": time.perf_counter() - t0, "kept": True}])
    good = _snapshot(model)
    dense0, dense_target = 1.0 - history[0]["sparsity"], 1.0 - target
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        # The same fraction of what remains each round, from the density the model came with.
        goal = 1.0 - dense0 * (dense_target / dense0) ** (r / rounds) if dense_target < dense0 else 0.0
        prune_to(pairs, method, goal, scope, **method_kwargs)
        if rewind_to is not None:
            _rewind(model, rewind_to)
        train_fn(model)
        metric = float(eval_fn(model))
        kept = sign * (baseline - metric) <= max_drop
        history.append({"round": r, "sparsity": _sparsity(pairs), "metric": metric,
                        "seconds": time.perf_counter() - t0, "kept": kept})
        if not kept:
            _restore(model, pairs, names, good)
            break
        good = _snapshot(model)
    return history
