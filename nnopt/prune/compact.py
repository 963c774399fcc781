"""``compact(model)``: removes structurally pruned neurons so the model gets smaller, computing the same function.

A neuron ``j`` of ``nn.Linear`` L1 whose weight row is all zero (a column of a transformers ``Conv1D``, whose weight
is stored ``[in, out]``; Conv1D is handled as the Linear it is throughout) (what ``ln_structured(..., dim=0)`` leaves)
outputs the constant ``b_j``. Where L1 feeds the next ``nn.Linear`` L2 through a chain of per-feature
operations (activations, dropout, BatchNorm1d, scalar arithmetic) that nothing else reads, the neuron goes:

- L1 loses row ``j`` of its weight and entry ``j`` of its bias; BatchNorm1d / per-channel PReLU in the chain lose
  entry ``j`` of their parameters and running statistics;
- the chain maps the constant ``b_j`` to a constant ``c_j`` (in eval semantics: dropout is the identity,
  BatchNorm1d uses its running statistics), and L2 absorbs it: ``b2 += W2[:, j] * c_j``; then L2 loses column
  ``j``. (torch's structured pruning zeroes rows but not biases, so ``c_j`` is generally nonzero; L2 gains a
  bias when it had none and the folded constant is not zero.)

The model is changed in place; in eval mode it computes the same function (up to float rounding), with fewer
parameters. Masks under nnopt's contract are sliced with their tensors and stay linked. Build optimizers after
compacting: the compacted tensors are new parameters.

The data flow comes from ``torch.fx`` symbolic tracing, so nn.Sequential and plain module trees (with
functional activations) are followed alike; a model that cannot be traced falls back to the chains inside its
nn.Sequential containers. Layers it cannot follow — a Linear whose output also goes elsewhere or is the model's
output, a chain through a non-per-feature operation (LayerNorm, softmax, a reshape), a shared module, a tensor
pruned with torch.nn.utils.prune's hooks, a structurally pruned Conv — are left alone and named in the report.
"""

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.layers import in_dim, in_out_features, is_conv1d, weight_as_linear
from nnopt.prune._contract import apply_mask, current_mask, pruned_names, remove_mask

__all__ = ["CompactReport", "compact"]

# Per-feature modules with no parameters to slice; dropout variants are the identity in eval mode.
_ELEMENTWISE_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink,
    nn.Softshrink, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Dropout, nn.AlphaDropout, nn.Dropout1d,
)
_DROPOUT_FUNCTIONS = {F.dropout, F.alpha_dropout, torch.dropout, torch.alpha_dropout}
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid, F.tanh, F.softplus,
    F.softsign, F.hardtanh, F.hardswish, F.hardsigmoid, F.hardshrink, F.softshrink, F.tanhshrink, F.logsigmoid,
    F.threshold, torch.relu, torch.sigmoid, torch.tanh, torch.selu, torch.celu, torch.abs, torch.exp,
} | _DROPOUT_FUNCTIONS
_SCALAR_OPERATORS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.div}
_COMMUTATIVE = {operator.add, operator.mul, torch.add, torch.mul}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "exp", "contiguous",
                        "clone"}


@dataclasses.dataclass
class CompactReport:
    """What ``compact`` did. ``compacted``: one dict per removal (layer, next, through, removed, kept);
    ``left_alone``: (module name, reason) for each structurally pruned layer it could not follow."""

    compacted: list = dataclasses.field(default_factory=list)
    left_alone: list = dataclasses.field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    traced: bool = True

    def __str__(self):
        share = self.params_after / max(1, self.params_before)
        lines = [f"compact: {self.params_before:,} -> {self.params_after:,} parameters ({share:.1%})"]
        for c in self.compacted:
            via = " -> ".join(c["through"])
            lines.append(f"  {c['layer']}: removed {c['removed']} of {c['removed'] + c['kept']} units "
                         f"(folded into {c['next']}{' via ' + via if via else ''})")
        for name, why in self.left_alone:
            lines.append(f"  left alone: {name}: {why}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Mid:
    """One per-feature step between two Linear layers."""

    label: str
    apply: object  # constant (2, width) -> (2, width), eval semantics
    module: nn.Module = None  # a module whose per-feature parameters are sliced with the features


@dataclasses.dataclass
class _Chain:
    first: str
    mids: list
    second: str


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _hooked(module):
    """Why ``module``'s weight/bias cannot be sliced in place, or None."""
    if any(hasattr(module, n + "_orig") for n in ("weight", "bias")):
        return ("pruned with torch.nn.utils.prune (a hook recomputes its weight); call "
                "torch.nn.utils.prune.remove or nnopt.prune.from_torch first")
    if getattr(module, "parametrizations", None):
        return "its tensors are parametrized (torch.nn.utils.parametrize)"
    return None


def _mid_module(module, width):
    """A _Mid for a per-feature module, or the reason it is not one."""
    if isinstance(module, _ELEMENTWISE_MODULES):
        if isinstance(module, (nn.Dropout, nn.AlphaDropout, nn.Dropout1d)):
            return _Mid(type(module).__name__, lambda c: c)
        return _Mid(type(module).__name__, module)
    if isinstance(module, nn.BatchNorm1d):
        if module.num_features != width:
            return f"BatchNorm1d({module.num_features}) does not match the {width} features"
        return _Mid("BatchNorm1d", module, module)
    if isinstance(module, nn.PReLU):
        if module.num_parameters not in (1, width):
            return f"PReLU({module.num_parameters}) does not match the {width} features"
        return _Mid("PReLU", module, module if module.num_parameters > 1 else None)
    return f"{type(module).__name__} is not a per-feature operation compact can follow"


def _is_linear(module):
    return type(module) is nn.Linear or is_conv1d(module)


def _out_features(module):
    return in_out_features(module)[1]


def _in_features(module):
    return in_out_features(module)[0]


def _set_features(module, in_features=None, out_features=None):
    conv1d = is_conv1d(module)
    if in_features is not None:
        setattr(module, "nx" if conv1d else "in_features", in_features)
    if out_features is not None:
        setattr(module, "nf" if conv1d else "out_features", out_features)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with transformers' Conv1D as a leaf (a Linear, not code to trace through)."""

    def is_leaf_module(self, m, qualname):
        return is_conv1d(m) or super().is_leaf_module(m, qualname)


def _chains_fx(model, graph):
    """(chains, {linear name: reason}) from a traced graph."""
    from torch.fx.node import map_arg

    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def other_nodes(node, first):
        found = []
        map_arg((node.args[1:], node.kwargs), lambda a: found.append(a) or a)
        return [a for a in found if a is not first]

    chains, failed = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not _is_linear(model.get_submodule(node.target)):
            continue
        name, width = node.target, _out_features(model.get_submodule(node.target))
        if calls[name] > 1:
            failed[name] = f"called {calls[name]} times in forward (a shared layer)"
            continue
        cur, mids, reason = node, [], None
        while reason is None:
            users = list(cur.users)
            if len(users) != 1:
                reason = (f"its output feeds {len(users)} operations" if users else "its output is unused")
                break
            u = users[0]
            if (u.op == "call_function" and u.target in _COMMUTATIVE and len(u.args) == 2 and u.args[1] is cur
                    and isinstance(u.args[0], (int, float)) and not u.kwargs):
                u_args = (cur, u.args[0])  # 2.0 * x: the scalar first
            else:
                u_args = u.args
            if not u_args or u_args[0] is not cur or other_nodes(u, cur):
                reason = f"its output reaches {u.name} ({u.op} {u.target}), which mixes it with other tensors"
                break
            if u.op == "output":
                reason = "its outputs are the model's outputs"
            elif u.op == "call_module":
                sub = model.get_submodule(u.target)
                if _is_linear(sub):
                    if calls[u.target] > 1:
                        reason = f"the next layer {u.target} is called {calls[u.target]} times in forward"
                    elif len(u.args) != 1 or u.kwargs or _in_features(sub) != width:
                        reason = f"the next layer {u.target} is called in a way compact cannot follow"
                    else:
                        chains.append(_Chain(name, mids, u.target))
                        break
                else:
                    mid = _mid_module(sub, width)
                    if isinstance(mid, str):
                        reason = f"its output goes through {u.target}: {mid}"
                    elif mid.module is not None and calls[u.target] > 1:
                        reason = f"{u.target} ({type(sub).__name__}) is called {calls[u.target]} times in forward"
                    else:
                        mid.label = f"{u.target} ({mid.label})"
                        mids.append(mid)
                        cur = u
            elif u.op == "call_function" and u.target in _ELEMENTWISE_FUNCTIONS:
                fn, args, kwargs = u.target, u.args[1:], dict(u.kwargs)
                if fn in _DROPOUT_FUNCTIONS:
                    mids.append(_Mid(u.name, lambda c: c))
                else:
                    mids.append(_Mid(u.name, lambda c, fn=fn, a=args, k=kwargs: fn(c, *a, **k)))
                cur = u
            elif (u.op == "call_function" and u.target in _SCALAR_OPERATORS and len(u_args) == 2
                  and isinstance(u_args[1], (int, float)) and not u.kwargs):
                mids.append(_Mid(u.name, lambda c, fn=u.target, s=u_args[1]: fn(c, s)))
                cur = u
            elif u.op == "call_method" and u.target in _ELEMENTWISE_METHODS:
                mids.append(_Mid(u.name, lambda c, m=u.target, a=u.args[1:], k=dict(u.kwargs): getattr(c, m)(*a, **k)))
                cur = u
            else:
                reason = f"its output goes through {u.name} ({u.op} {getattr(u.target, '__name__', u.target)}), " \
                         "which compact cannot follow"
        if reason is not None:
            failed[name] = reason
    return chains, failed


def _chains_sequential(model):
    """(chains, {linear name: reason}) from the nn.Sequential containers of an untraceable model."""
    chains, failed = [], {}
    for prefix, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.named_children())
        for i, (name, module) in enumerate(children):
            if not _is_linear(module):
                continue
            full = f"{prefix}.{name}" if prefix else name
            width, mids, j, reason = _out_features(module), [], i + 1, None
            while j < len(children):
                sub_name, sub = children[j]
                sub_full = f"{prefix}.{sub_name}" if prefix else sub_name
                if _is_linear(sub):
                    if _in_features(sub) != width:
                        reason = f"the next layer {sub_full} does not take its {width} features"
                    else:
                        chains.append(_Chain(full, mids, sub_full))
                    break
                mid = _mid_module(sub, width)
                if isinstance(mid, str):
                    reason = f"its output goes through {sub_full}: {mid}"
                    break
                mid.label = f"{sub_full} ({mid.label})"
                mids.append(mid)
                j += 1
            else:
                reason = "it ends its nn.Sequential, and the model's forward could not be traced beyond it"
            if reason is not None:
                failed[full] = reason
    return chains, failed


def _replace(module, name, value, slicer):
    """Sets ``module.<name>`` (parameter or buffer) to ``value``; a mask under nnopt's contract is sliced alike."""
    if name in module._buffers:
        module._buffers[name] = value
        return
    mask = None
    if name in pruned_names(module):
        mask = slicer(current_mask(module, name))
        remove_mask(module, name)
    old = module._parameters[name]
    module._parameters[name] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    if mask is not None:
        apply_mask(module, name, mask.contiguous())


def _slice_features(module, keep):
    """Keeps features ``keep`` of a per-feature module (BatchNorm1d, PReLU)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 1:
            _replace(module, name, t.detach()[keep].clone(), lambda m: m[keep])
    if isinstance(module, nn.BatchNorm1d):
        module.num_features = int(keep.numel())
    else:
        module.num_parameters = int(keep.numel())


@torch.no_grad()
def _constant_through(mids, b):
    """The chain's output (eval semantics) for the constant input ``b`` of shape (width,).

    Two equal rows: a BatchNorm without running statistics needs a batch, and normalizes a constant to beta.
    """
    c = b.unsqueeze(0).expand(2, -1).clone()
    for mid in mids:
        m = mid.apply
        if isinstance(m, nn.Module):
            was = m.training
            m.eval()
            try:
                c = m(c)
            finally:
                m.train(was)
        else:
            c = m(c)
    return c[0]


@torch.no_grad()
def _compact_chain(model, chain, report):
    first, second = model.get_submodule(chain.first), model.get_submodule(chain.second)
    for n, m in ((chain.first, first), (chain.second, second)):
        why = _hooked(m)
        if why is not None:
            return n, why
    w1 = weight_as_linear(first).detach()  # [out, in], Conv1D included
    dead = ~(w1 != 0).any(dim=1)
    if not bool(dead.any()):
        return None
    if bool(dead.all()):
        dead[0] = False  # keep one unit so no layer has zero features
    keep = (~dead).nonzero().flatten()
    gone = dead.nonzero().flatten()
    b1 = first.bias.detach() if first.bias is not None else torch.zeros(w1.shape[0], dtype=w1.dtype,
                                                                          device=w1.device)
    const = _constant_through(chain.mids, b1)
    w2 = weight_as_linear(second).detach()
    fold = (w2[:, gone].double() @ const[gone].double()).to(w2.dtype)
    if second.bias is not None:
        _replace(second, "bias", second.bias.detach() + fold, lambda m: m)
    elif bool((fold != 0).any()):
        second.bias = nn.Parameter(fold)
    out_dim1, in_dim2 = 1 - in_dim(first), in_dim(second)  # the dims that index those units in storage
    _replace(first, "weight", first.weight.detach().index_select(out_dim1, keep),
             lambda m: m.index_select(out_dim1, keep))
    if first.bias is not None:
        _replace(first, "bias", b1[keep].clone(), lambda m: m[keep])
    _set_features(first, out_features=int(keep.numel()))
    for mid in chain.mids:
        if mid.module is not None:
            _slice_features(mid.module, keep)
    _replace(second, "weight", second.weight.detach().index_select(in_dim2, keep),
             lambda m: m.index_select(in_dim2, keep))
    _set_features(second, in_features=int(keep.numel()))
    report.compacted.append({"layer": chain.first, "next": chain.second, "through": [m.label for m in chain.mids],
                             "removed": int(gone.numel()), "kept": int(keep.numel())})
    return None


def _structurally_pruned(module):
    if is_conv1d(module):
        return bool((~(weight_as_linear(module).detach() != 0).any(1)).any())
    w = module._parameters.get("weight")
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        w = getattr(module, "weight", None)  # torch.nn.utils.prune keeps the masked weight as an attribute
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            return False
    return bool((~(w.detach() != 0).flatten(1).any(1)).any())


def compact(model):
    """Removes the structurally pruned neurons of ``model``'s Linear chains, in place; returns a CompactReport.

    In eval mode the compacted model computes the same function as before. See the module docstring.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compact: model must be an nn.Module, got {type(model).__name__}")
    report = CompactReport(params_before=_n_params(model))
    try:
        graph = _Tracer().trace(model)
        chains, failed = _chains_fx(model, graph)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: follow nn.Sequential only
        report.traced = False
        chains, failed = _chains_sequential(model)
        why = f"the model could not be traced ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) " \
              "and the layer is not followed by a Linear inside an nn.Sequential"
        for name, m in model.named_modules():
            if _is_linear(m) and name not in failed and all(name != c.first for c in chains):
                failed[name] = why
    handled = set()
    for chain in chains:  # in forward order: a layer's own dead units are found after upstream folding
        left = _compact_chain(model, chain, report)
        handled.add(chain.first)
        if left is not None and _structurally_pruned(model.get_submodule(chain.first)):
            report.left_alone.append(left)
    for name, module in model.named_modules():
        if name in handled or not _structurally_pruned(module):
            continue
        if _is_linear(module):
            why = failed.get(name) or _hooked(module) or "the traced forward does not call it as a module"
        else:
            why = f"{type(module).__name__}: compact removes units of nn.Linear and Conv1D layers only"
        report.left_alone.append((name, why))
    report.params_after = _n_params(model)
    return report
