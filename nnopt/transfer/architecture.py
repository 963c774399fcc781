"""Architecture transfer: clone a model's structure, grow it without changing its function (Net2Net), or shrink it.

- ``clone_architecture(model, init="reset")``: a deep copy. ``"reset"`` re-initialises every parameter: each
  module's own initialiser (``reset_parameters`` / ``_reset_parameters``) runs, descendants before ancestors (so a
  container's own initialiser has the last word); a parameter none of them writes gets the fallback of
  ``transfer_parameters`` (normal(0, 0.02) for 2+ dimensions, ones for a 1-D ``weight``, zeros otherwise).
  Buffers are reset where an initialiser resets them (BatchNorm's running statistics) and kept otherwise
  (constant tables such as positional encodings are part of the architecture). Masks under nnopt.prune's
  contract are dropped: a fresh model is dense, and a mask chosen for the old weights says nothing about new
  random ones. ``"copy"``: the parameters, buffers and masks are copied (the masks relinked).
- ``widen(model, layer, new_width, noise=0.0)``: Net2WiderNet (Chen et al., 2016). The ``nn.Linear`` ``layer`` gets
  ``new_width`` output units: units ``0..n-1`` stay, each new unit ``j >= n`` replicates an existing unit ``g(j)``
  drawn uniformly at random (its weight row, bias, and the entries of every per-feature module in between:
  BatchNorm1d affine parameters and running statistics, a per-channel PReLU's slope). Each input column ``i`` of
  the next ``nn.Linear`` is divided by the number of units now computing unit ``i`` and copied to the replicas,
  so the output is unchanged. ``noise > 0`` adds N(0, (noise * std(W))^2) to the weight rows of the new units
  (std(W): the layer's weight standard deviation; ``noise`` itself where that is 0) to break their symmetry; the
  function then changes by the reported deviation.
- ``deepen(model, after=layer)``: Net2DeeperNet. After the activation that follows the ``nn.Linear`` ``layer``
  (BatchNorm1d and dropout may sit between them) it inserts an identity ``nn.Linear(w, w)`` (``w`` =
  ``layer.out_features``, zero bias) and a copy of the activation. The function is unchanged exactly when the
  activation is idempotent on its outputs (f(f(x)) = f(x)): ReLU, ReLU6, Hardtanh (a clamp) and Identity are; any
  other activation (LeakyReLU, Tanh, GELU, Sigmoid, ...) is refused.
- ``narrow(model, layer, new_width, importance="l1")``: keeps the ``new_width`` most important output units of
  ``layer`` and removes the other units' rows (and bias entries), their entries of the per-feature modules in
  between and the matching input columns of the next ``nn.Linear``. Importance is the structured-pruning
  criterion of ``nnopt.prune.ln_structured(..., dim=0)`` (torch's LnStructured): the L1 (``"l1"``) or L2
  (``"l2"``) norm of each weight row; ``"random"``; or a callable ``importance(layer_module)`` returning one score
  per output unit (higher = more important). Ties go to the lower index; kept units stay in their order. The
  function changes; the report says by how much.

Where. ``layer`` is a qualified module name (``"0"``, ``"encoder.2"``) or the module itself, and must be an
``nn.Linear`` (exactly: subclasses may compute something else) inside an ``nn.Sequential`` (one that does not
override ``forward``). The modules that run after it are found by walking that Sequential onward, entering
nested Sequentials and leaving a finished one for the Sequential that holds it. ``widen`` and ``narrow`` need
per-feature modules (activations, dropout, BatchNorm1d, PReLU, Identity) and then an ``nn.Linear`` taking its
features; anything else (a Conv, LayerNorm, the end of the chain) raises ValueError saying what was expected.
Layers, BatchNorm1d and PReLU modules used at more than one place in the model are refused.

In place. All three change ``model`` in place and return a report (``WidenReport``, ``DeepenReport``,
``NarrowReport``: data fields and a printable ``str()``). Changed modules are replaced by new ones of the same
dtype and device (requires_grad, training mode and nnopt.prune masks carried over, masks replicated or sliced
with their tensors), so build optimizers afterwards; hooks registered on the replaced modules do not carry over.
``deepen`` inserts into a Sequential: in one with numbered children the modules after the insertion are
renumbered (``DeepenReport.renamed`` maps old names to new ones).

Deviation. Each report holds ``max_abs_deviation``, max |f_after(x) - f_before(x)| in eval mode (dropout off,
BatchNorm on running statistics) on a probe batch: ``probe=`` (an input of the whole model) when given, else 64
N(0, 1) random inputs of ``layer`` run through the changed chain (``layer`` to the next Linear; the rest of the
model is unchanged, so this is the change of everything downstream's input). ``generator=`` (a CPU
``torch.Generator``) makes the random choices, the noise and the probe reproducible.
"""

import contextlib
import copy
import dataclasses
import math
import numbers

import torch
from torch import nn

from nnopt.prune._contract import apply_mask, current_mask, pruned_names, relink, remove_mask
from nnopt.prune.compact import _ELEMENTWISE_MODULES
from nnopt.transfer.parameters import fallback_init_, initialiser_of

__all__ = ["DeepenReport", "NarrowReport", "WidenReport", "clone_architecture", "deepen", "narrow", "widen"]

PROBE_ROWS = 64
IDEMPOTENT_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout)
IMPORTANCES = ("l1", "l2", "random")


# ----------------------------------------------------------------------------------------------------- reports
@dataclasses.dataclass
class WidenReport:
    """What ``widen`` did: ``replicated[k]`` is the existing unit new unit ``old_width + k`` copies."""

    layer: str
    next: str
    through: list
    old_width: int
    new_width: int
    replicated: list
    noise: float
    max_abs_deviation: float
    probe: str

    def __str__(self):
        via = " -> ".join(self.through)
        return (f"widen {self.layer}: {self.old_width} -> {self.new_width} units (next: {self.next}"
                f"{', via ' + via if via else ''})\n"
                f"  new units replicate units {self.replicated}\n"
                f"  noise {self.noise:g}; max |output change| {self.max_abs_deviation:.3g} on {self.probe}")


@dataclasses.dataclass
class DeepenReport:
    """What ``deepen`` did: ``inserted`` names the identity Linear and the activation copy (their new names)."""

    after: str
    activation: str
    inserted: list
    width: int
    renamed: dict
    max_abs_deviation: float
    probe: str

    def __str__(self):
        lines = [f"deepen after {self.after}, activation {self.activation}: inserted {', '.join(self.inserted)} "
                 f"(identity Linear({self.width}, {self.width}) and a copy of the activation)"]
        if self.renamed:
            lines.append("  renamed " + ", ".join(f"{a} -> {b}" for a, b in self.renamed.items()))
        lines.append(f"  max |output change| {self.max_abs_deviation:.3g} on {self.probe}")
        return "\n".join(lines)


@dataclasses.dataclass
class NarrowReport:
    """What ``narrow`` did: the kept and removed unit indices (old numbering) and the removed units' scores."""

    layer: str
    next: str
    through: list
    old_width: int
    new_width: int
    importance: str
    kept: list
    removed: list
    removed_scores: list
    max_abs_deviation: float
    probe: str

    def __str__(self):
        via = " -> ".join(self.through)
        return (f"narrow {self.layer}: {self.old_width} -> {self.new_width} units by {self.importance} "
                f"(next: {self.next}{', via ' + via if via else ''})\n"
                f"  removed units {self.removed}\n"
                f"  max |output change| {self.max_abs_deviation:.3g} on {self.probe}")


# ------------------------------------------------------------------------------------------------------ clone
def clone_architecture(model, init="reset"):
    """A deep copy of ``model``: freshly initialised, masks dropped (``"reset"``), or with everything (``"copy"``)."""
    if init not in ("reset", "copy"):
        raise ValueError(f"clone_architecture: init must be 'reset' or 'copy', got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"clone_architecture: model must be an nn.Module, got {type(model).__name__}")
    clone = copy.deepcopy(model)
    if init == "copy":
        return relink(clone)
    modules = list(clone.modules())
    for module in modules:
        for name in pruned_names(module):
            remove_mask(module, name)
    with torch.no_grad():
        params = []
        seen = set()
        for module in modules:
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in seen and (p.is_floating_point() or p.is_complex()):
                    seen.add(id(p))
                    params.append((name, p))
                    p.fill_(math.nan)  # what no initialiser writes shows up as NaN and gets the fallback
        for module in reversed(modules):  # descendants before ancestors
            init_name = initialiser_of(module)
            if init_name is not None:
                getattr(module, init_name)()
        for name, p in params:
            if bool(torch.isnan(p).any()):
                fallback_init_(p, name, True)
    return clone


# ------------------------------------------------------------------------------------------- finding chains
def _plain_sequential(m):
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _join(prefix, key):
    return f"{prefix}.{key}" if prefix else key


def _resolve(model, layer, what):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer:
                return name, m
        raise ValueError(f"{what}: the given {type(layer).__name__} is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"{what}: layer must be a module name (str) or an nn.Module, got {type(layer).__name__}")
    try:
        m = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"{what}: the model has no layer named {layer!r}") from None
    return layer, m


def _check_in_sequential(model, name, what):
    pname, _, _ = name.rpartition(".")
    parent = model.get_submodule(pname) if pname else model
    if not name or not _plain_sequential(parent):
        raise ValueError(f"{what}: layer {name!r} is not a child of an nn.Sequential; expected a Linear inside an "
                         "nn.Sequential (nested ones included), whose following modules are known. For the blocks of "
                         "a transformer use nnopt.transfer.widen_mlp / narrow_mlp (MLP width), add_heads / "
                         "remove_heads, insert_block (depth) or widen_hidden, which follow the model's graph")


def _leaves(qual, module):
    if _plain_sequential(module):
        for key, child in module._modules.items():
            if child is not None:
                yield from _leaves(_join(qual, key), child)
    else:
        yield qual, module


def _after(model, name):
    """(qualified name, module) of the modules that run after ``name``, through nested plain nn.Sequentials."""
    parts = name.split(".")
    while parts:
        pname = ".".join(parts[:-1])
        parent = model.get_submodule(pname) if pname else model
        if not _plain_sequential(parent):
            return
        keys = list(parent._modules)
        for key in keys[keys.index(parts[-1]) + 1:]:
            if parent._modules[key] is not None:
                yield from _leaves(_join(pname, key), parent._modules[key])
        parts = parts[:-1]


def _uses(model):
    counts = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def _per_feature(m, width):
    """None when ``m`` acts on each of ``width`` features separately (and can be widened/narrowed), else why not."""
    if isinstance(m, _ELEMENTWISE_MODULES) and not isinstance(m, nn.PReLU):
        return None
    if type(m) is nn.BatchNorm1d:
        return None if m.num_features == width else f"BatchNorm1d({m.num_features}) does not take {width} features"
    if type(m) is nn.PReLU:
        return None if m.num_parameters in (1, width) else f"PReLU({m.num_parameters}) does not take {width} features"
    return f"{type(m).__name__} is not a per-feature module"


_EXPECTED = ("per-feature modules (activations, dropout, BatchNorm1d, PReLU) and then an nn.Linear taking its "
             "{w} features, in the same nn.Sequential chain")


def _chain(model, layer, what):
    """(name, Linear, [(name, per-feature module)], (next name, next Linear)) of the chain starting at ``layer``."""
    name, lin = _resolve(model, layer, what)
    if type(lin) is not nn.Linear:
        raise ValueError(f"{what}: layer {name!r} is a {type(lin).__name__}; expected an nn.Linear")
    _check_in_sequential(model, name, what)
    width, mids = lin.out_features, []
    expected = _EXPECTED.format(w=width)
    uses = _uses(model)
    for qual, m in _after(model, name):
        if type(m) is nn.Linear:
            if m.in_features != width:
                raise ValueError(f"{what}: the next Linear {qual!r} takes {m.in_features} features, not the "
                                 f"{width} of {name!r}")
            for n, mod in [(name, lin), (qual, m)] + [(q, x) for q, x in mids if type(x) in (nn.BatchNorm1d,
                                                                                               nn.PReLU)]:
                if uses[id(mod)] > 1:
                    raise ValueError(f"{what}: {n!r} ({type(mod).__name__}) is used at {uses[id(mod)]} places in "
                                     "the model; changing its width would break the other uses")
            return name, lin, mids, (qual, m)
        why = _per_feature(m, width)
        if why is not None:
            raise ValueError(f"{what}: after {name!r} expected {expected}; found {qual!r}: {why}")
        mids.append((qual, m))
    raise ValueError(f"{what}: after {name!r} expected {expected}; the chain ends"
                     + (f" after {mids[-1][0]!r}" if mids else " right after it"))


# --------------------------------------------------------------------------------------------- replacements
def _set_module(model, qual, new):
    pname, _, key = qual.rpartition(".")
    parent = model.get_submodule(pname) if pname else model
    parent._modules[key] = new


def _carry(old, new, name, mask_fn):
    """Copies requires_grad and the nnopt.prune mask (transformed by ``mask_fn``) of ``old.<name>`` onto ``new``."""
    p_old, p_new = getattr(old, name, None), getattr(new, name, None)
    if p_old is None or p_new is None:
        return
    if isinstance(p_new, nn.Parameter):
        p_new.requires_grad_(p_old.requires_grad)
    if name in pruned_names(old):
        apply_mask(new, name, mask_fn(current_mask(old, name)))


@torch.no_grad()
def _new_linear(old, weight, bias, row_fn, col_fn):
    """An nn.Linear holding ``weight``/``bias``; masks of ``old`` go through ``row_fn`` (rows) then ``col_fn``."""
    out_f, in_f = weight.shape
    new = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=old.bias is not None,
                                   device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.train(old.training)
    _carry(old, new, "weight", lambda m: col_fn(row_fn(m)))
    _carry(old, new, "bias", row_fn)
    return new


@torch.no_grad()
def _index_features(m, index):
    """A copy of per-feature module ``m`` keeping (or repeating) features ``index``; None for a stateless one."""
    if type(m) is nn.BatchNorm1d:
        new = nn.BatchNorm1d(int(index.numel()), eps=m.eps, momentum=m.momentum, affine=m.affine,
                             track_running_stats=m.track_running_stats, device=_device(m), dtype=_dtype(m))
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, name)
            if t is not None:
                getattr(new, name).copy_(t[index])
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    elif type(m) is nn.PReLU and m.num_parameters > 1:
        new = nn.PReLU(int(index.numel()), device=m.weight.device, dtype=m.weight.dtype)
        new.weight.copy_(m.weight[index])
    else:
        return None
    new.train(m.training)
    for name in ("weight", "bias"):
        _carry(m, new, name, lambda mask: mask[index])
    return new


def _device(m):
    t = next(iter(list(m.parameters()) + list(m.buffers())), None)
    return t.device if t is not None else None


def _dtype(m):
    t = next((t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()), None)
    return t.dtype if t is not None else None


# ------------------------------------------------------------------------------------------------- probing
@contextlib.contextmanager
def _eval(modules):
    flags = [(m, m.training) for top in modules for m in top.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class _Probe:
    """Runs the model (``probe`` given) or the changed chain on a random batch, before and after the change."""

    def __init__(self, model, probe, lin, generator):
        self.model, self.probe = model, probe
        if probe is None:
            x = torch.randn(PROBE_ROWS, lin.in_features, generator=generator, dtype=torch.float64)
            self.x = x.to(device=lin.weight.device, dtype=lin.weight.dtype)

    @torch.no_grad()
    def run(self, chain):
        if self.probe is not None:
            with _eval([self.model]):
                out = self.model(self.probe)
            if not isinstance(out, torch.Tensor):  # checked on the run before the change
                raise TypeError(f"the model's output for the probe is a {type(out).__name__}; a tensor is needed "
                                "to measure the deviation")
            return out
        with _eval(chain):
            y = self.x
            for m in chain:
                y = m(y)
            return y

    def describe(self, name, last):
        if self.probe is not None:
            return f"the model's output for the given probe (shape {tuple(self.probe.shape)})"
        return f"{PROBE_ROWS} random N(0, 1) inputs of {name}, output of {last}"

    @staticmethod
    def deviation(before, after):
        return float((after.double() - before.double()).abs().max()) if before.numel() else 0.0


def _check_width(what, new_width):
    if not isinstance(new_width, numbers.Integral) or isinstance(new_width, bool):
        raise TypeError(f"{what}: new_width must be an int, got {type(new_width).__name__}")


# --------------------------------------------------------------------------------------------------- widen
@torch.no_grad()
def widen(model, layer, new_width, noise=0.0, *, probe=None, generator=None):
    """Net2WiderNet: ``layer`` (an nn.Linear) gets ``new_width`` output units, function preserved; a WidenReport."""
    name, lin, mids, (next_name, nxt) = _chain(model, layer, "widen")
    _check_width("widen", new_width)
    n = lin.out_features
    if new_width <= n:
        raise ValueError(f"widen: new_width={new_width} must be larger than the current width {n} of {name!r} "
                         "(use narrow to shrink)")
    if not isinstance(noise, numbers.Real) or isinstance(noise, bool) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"widen: noise must be a finite number >= 0, got {noise!r}")
    pr = _Probe(model, probe, lin, generator)
    before = pr.run([lin] + [m for _, m in mids] + [nxt])

    g = torch.cat([torch.arange(n), torch.randint(0, n, (new_width - n,), generator=generator)])
    counts = torch.bincount(g, minlength=n)
    gd = g.to(lin.weight.device)
    w1 = lin.weight.detach()[gd].clone()
    if noise > 0:
        std = float(lin.weight.detach().double().std()) if lin.weight.numel() > 1 else 0.0
        scale = noise * std if std > 0 else noise
        eps = torch.randn(new_width - n, w1.shape[1], generator=generator, dtype=torch.float64) * scale
        w1[n:] += eps.to(device=w1.device, dtype=w1.dtype)
    b1 = lin.bias.detach()[gd] if lin.bias is not None else None
    new_lin = _new_linear(lin, w1, b1, lambda m: m[gd], lambda m: m)
    scale = (1.0 / counts.double())[g].to(device=nxt.weight.device, dtype=nxt.weight.dtype)
    gn = g.to(nxt.weight.device)
    w2 = nxt.weight.detach()[:, gn] * scale
    new_next = _new_linear(nxt, w2, nxt.bias, lambda m: m, lambda m: m[:, gn])

    new_mids = []
    for qual, m in mids:
        new = _index_features(m, g.to(_device(m) or "cpu"))
        if new is not None:
            _set_module(model, qual, new)
        new_mids.append(new if new is not None else m)
    _set_module(model, name, new_lin)
    _set_module(model, next_name, new_next)
    after = pr.run([new_lin] + new_mids + [new_next])
    return WidenReport(name, next_name, [q for q, _ in mids], n, int(new_width), g[n:].tolist(), float(noise),
                       pr.deviation(before, after), pr.describe(name, next_name))


# -------------------------------------------------------------------------------------------------- narrow
def _scores(lin, importance, generator):
    n = lin.out_features
    w = lin.weight.detach()
    if isinstance(importance, str):
        if importance not in IMPORTANCES:
            raise ValueError(f"narrow: importance must be one of {IMPORTANCES} or a callable, got {importance!r}")
        if importance == "random":
            return torch.rand(n, generator=generator, dtype=torch.float64), "random"
        order = 1 if importance == "l1" else 2
        return torch.linalg.vector_norm(w.double(), ord=order, dim=1).cpu(), f"{importance} norm of weight rows"
    if not callable(importance):
        raise TypeError(f"narrow: importance must be one of {IMPORTANCES} or a callable, got "
                        f"{type(importance).__name__}")
    s = importance(lin)
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != (n,):
        raise ValueError(f"narrow: importance({name_of(importance)}) must return a tensor of shape ({n},), one "
                         f"score per output unit; got {getattr(s, 'shape', type(s).__name__)}")
    return s.detach().double().cpu(), name_of(importance)


def name_of(fn):
    return getattr(fn, "__name__", type(fn).__name__)


@torch.no_grad()
def narrow(model, layer, new_width, importance="l1", *, probe=None, generator=None):
    """Keeps the ``new_width`` most important output units of ``layer`` (an nn.Linear); a NarrowReport."""
    name, lin, mids, (next_name, nxt) = _chain(model, layer, "narrow")
    _check_width("narrow", new_width)
    n = lin.out_features
    if not 1 <= new_width < n:
        raise ValueError(f"narrow: new_width={new_width} must be in [1, {n}): smaller than the current width {n} of "
                         f"{name!r} (use widen to grow)")
    scores, how = _scores(lin, importance, generator)
    pr = _Probe(model, probe, lin, generator)
    before = pr.run([lin] + [m for _, m in mids] + [nxt])

    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.sort(order[:new_width]).values
    removed = torch.sort(order[new_width:]).values
    kd, kn = keep.to(lin.weight.device), keep.to(nxt.weight.device)
    b1 = lin.bias.detach()[kd] if lin.bias is not None else None
    new_lin = _new_linear(lin, lin.weight.detach()[kd], b1, lambda m: m[kd], lambda m: m)
    new_next = _new_linear(nxt, nxt.weight.detach()[:, kn], nxt.bias, lambda m: m, lambda m: m[:, kn])
    new_mids = []
    for qual, m in mids:
        new = _index_features(m, keep.to(_device(m) or "cpu"))
        if new is not None:
            _set_module(model, qual, new)
        new_mids.append(new if new is not None else m)
    _set_module(model, name, new_lin)
    _set_module(model, next_name, new_next)
    after = pr.run([new_lin] + new_mids + [new_next])
    return NarrowReport(name, next_name, [q for q, _ in mids], n, int(new_width), how, keep.tolist(),
                        removed.tolist(), scores[removed].tolist(), pr.deviation(before, after),
                        pr.describe(name, next_name))


# -------------------------------------------------------------------------------------------------- deepen
def _insert_after(seq, key, new_modules, prefix):
    """Inserts ``new_modules`` after child ``key`` of ``seq``; returns (their qualified names, {old: new name})."""
    items = list(seq._modules.items())
    keys = [k for k, _ in items]
    at = keys.index(key) + 1
    numbered = keys == [str(i) for i in range(len(keys))]
    if numbered:
        names = [str(i) for i in range(len(keys) + len(new_modules))]
        renamed = {_join(prefix, k): _join(prefix, str(i + len(new_modules))) for i, k in enumerate(keys)
                   if i >= at}
    else:
        names, renamed = list(keys), {}
        for j in range(len(new_modules)):
            base, i = f"{key}_deepen{j}", 0
            while (base if i == 0 else f"{base}_{i}") in names:
                i += 1
            names.insert(at + j, base if i == 0 else f"{base}_{i}")
    modules = [m for _, m in items[:at]] + list(new_modules) + [m for _, m in items[at:]]
    seq._modules.clear()
    for k, m in zip(names, modules):
        seq._modules[k] = m
    return [_join(prefix, names[at + j]) for j in range(len(new_modules))], renamed


@torch.no_grad()
def deepen(model, after, *, probe=None, generator=None):
    """Net2DeeperNet: an identity Linear and a copy of the activation after ``after``'s activation; a DeepenReport."""
    what = "deepen"
    name, lin = _resolve(model, after, what)
    if type(lin) is not nn.Linear:
        raise ValueError(f"{what}: layer {name!r} is a {type(lin).__name__}; expected an nn.Linear")
    _check_in_sequential(model, name, what)
    path, act_name, act = [], None, None
    for qual, m in _after(model, name):
        if type(m) is nn.BatchNorm1d or isinstance(m, _DROPOUTS):
            path.append(m)
            continue
        act_name, act = qual, m
        break
    if act is None or type(act) is nn.Linear or not isinstance(act, _ELEMENTWISE_MODULES + (nn.PReLU,)):
        found = "the end of the chain" if act is None else f"{type(act).__name__} at {act_name!r}"
        raise ValueError(f"{what}: expected an activation after {name!r} (BatchNorm1d and dropout may sit between "
                         f"them); found {found}")
    if type(act) not in IDEMPOTENT_ACTIVATIONS:
        allowed = ", ".join(t.__name__ for t in IDEMPOTENT_ACTIVATIONS)
        raise ValueError(f"{what}: the activation after {name!r} is {type(act).__name__} ({act_name!r}), which is not "
                         "idempotent (f(f(x)) != f(x)), so an identity layer followed by a copy of it would change "
                         f"the function; deepen supports {allowed}")
    width = lin.out_features
    pr = _Probe(model, probe, lin, generator)
    chain = [lin] + path + [act]
    before = pr.run(chain)
    ident = torch.nn.utils.skip_init(nn.Linear, width, width, device=lin.weight.device, dtype=lin.weight.dtype)
    ident.weight.copy_(torch.eye(width, dtype=ident.weight.dtype, device=ident.weight.device))
    ident.bias.zero_()
    ident.train(lin.training)
    act_copy = copy.deepcopy(act)
    pname, _, key = act_name.rpartition(".")
    seq = model.get_submodule(pname) if pname else model
    inserted, renamed = _insert_after(seq, key, [ident, act_copy], pname)
    after_out = pr.run(chain + [ident, act_copy])
    return DeepenReport(name, f"{act_name} ({type(act).__name__})", inserted, width, renamed,
                        pr.deviation(before, after_out), pr.describe(name, inserted[-1]))
