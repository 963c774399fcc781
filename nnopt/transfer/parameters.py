"""``transfer_parameters``: copies the weights of one model (or a ``state_dict``) into another, and says what it did.

``transfer_parameters(src, dst, mapping=None, *, match="name", on_mismatch="skip", strict=False,
reinit_missing=False, on_role_mismatch="error", dry_run=False)`` returns a ``TransferReport``
(``nnopt/transfer/report.py``) with one entry per tensor of ``dst.state_dict()`` and the list of source tensors
nothing took.

Tensors. The targets are the tensors of ``dst.state_dict()`` (parameters and persistent buffers), in its order;
the sources are the tensors of ``src.state_dict()`` (or of the mapping ``src``), in its order. Non-tensor entries
(``_extra_state``) are ignored. A bool ``<name>_mask`` beside a tensor ``<name>`` of the same shape is that
tensor's mask under nnopt.prune's contract: it has no entry of its own and travels with its tensor.

Matching (``match``):

- ``"name"``: a target takes the source tensor of the same name. With ``mapping`` (``{pattern: replacement}``,
  as Hugging Face's ``key_mapping``) every source name is renamed first: the patterns are tried in order and the
  first whose ``re.subn(pattern, replacement, name)`` substitutes anything renames it; names no pattern matches
  keep their name. A pattern that matches no source name, a renamed name that is not a target, two sources
  renamed to the same target and a bad pattern or replacement raise one ValueError naming them all.
- ``"order"``: for models that name their layers differently (a re-implemented architecture). Each side's
  tensors (masks aside) are grouped into layers: runs of consecutive names sharing the prefix before their last
  ``.`` (a state_dict lists each module's own tensors together). A layer's signature is the tuple of
  ``(shape, kind)`` of its tensors in order, kind one of float / complex / bool / int. The two sequences of
  layer signatures (source order, target order) are aligned by ``difflib.SequenceMatcher(None, src, dst,
  autojunk=False)``: the longest run of consecutive equal signatures is paired, then the parts left and right of
  it are aligned the same way, recursively. Aligned layers pair their tensors by position. Inside each stretch
  left unaligned on both sides (opcode ``replace``), layers are aligned once more, on coarse signatures (rank,
  kind) per tensor: those pairs differ in shape only (a classifier with more classes), and ``on_mismatch``
  decides. Every other target is missing and every other source unused. ``mapping`` cannot be combined with
  ``"order"``. Equal shapes do not make equal roles (a position table and a key projection can both be
  ``[128, 32]``), so each pair is checked by name: a tensor's role is read from the name of its module
  (``embedding``: ``wte``, ``wpe``, ``embed_tokens``, ``*embeddings``, ``lm_head``...; ``norm``: ``ln_*``,
  ``*norm*``, ``bn*``; ``projection``: ``*_proj``, ``c_attn``, ``c_fc``, ``query``/``key``/``value``, ``dense``,
  ``fc*``...; anything else ``other``, which pairs with every role). A pair of two known, different roles is
  refused: ``on_role_mismatch="error"`` (default) raises ValueError naming every such pair, ``"warn"`` warns
  naming them and copies, ``"ignore"`` copies.

Shape mismatches (``on_mismatch``), for a paired target whose shape differs from its source's:

- ``"skip"``: the target is re-initialised (below);
- ``"slice"``: for tensors of the same number of dimensions, the overlapping block ``[:min(a, b), ...]`` is
  copied and the rest of the target re-initialised (a classifier with more classes keeps the old rows); tensors
  of different rank are re-initialised;
- ``"error"``: ValueError naming every mismatched pair and both shapes.

Re-initialisation never leaves what was in memory (a ``dst`` built with ``torch.empty`` or
``torch.nn.utils.skip_init``): the owning module is deep-copied, the tensors to refresh are filled with NaN (ints
with 0) in the copy, the copy's ``reset_parameters()`` (or ``_reset_parameters()``, as MultiheadAttention) runs,
and its values are taken. A float tensor the initialiser did not write (NaN left), or of a module without one,
gets the fallback: parameters of 2 or more dimensions normal(0, 0.02) (BERT's and GPT-2's
``initializer_range``), a 1-D parameter named ``weight`` (a norm's scale) ones, anything else (biases, buffers)
zeros. The entry's ``detail`` names the initialiser used.

Missing targets keep the values ``dst`` was built with; ``reinit_missing=True`` re-initialises them as above (for
a ``dst`` built without initialisation). A missing target that is the same tensor as a target that received data
(tied weights) is reported ``tied``.

Conversions: values are ``copy_``-ed into ``dst``'s own tensors, so dtype and device follow ``dst`` and the tensor
objects (and any optimizer holding them) stay the same. Masks: a source mask comes with a copied tensor (sliced
with it; entries outside the copied block keep ``dst``'s mask, or stay unpruned) and is applied on ``dst`` with
``nnopt.prune``'s ``apply_mask``; a ``dst`` tensor that is pruned already and receives no mask keeps its mask and
its pruned entries are zeroed again.

``dry_run=True`` plans everything (pairs, statuses, details, the checks above) and returns the report without
writing into ``dst``; its ``dry_run`` attribute is True and ``str()`` says so.

``strict=True`` raises RuntimeError, listing every target not copied whole and every unused source, when anything
was not copied. Atomicity: every check (bad arguments, mapping errors, mismatches under ``"error"``, ``strict``,
meta tensors) and every re-initialisation happens before the first write, so a call that raises leaves ``dst``
unchanged.
"""

import copy
import dataclasses
import difflib
import math
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from nnopt import sparsity
from nnopt.prune._contract import MASK_SUFFIX, apply_mask, current_mask, pruned_names
from nnopt.transfer.report import COPIED, MISSING, REINITIALISED, SLICED, TIED, TransferEntry, TransferReport

__all__ = ["FALLBACK_STD", "transfer_parameters"]

MATCHES = ("name", "order")
ON_MISMATCH = ("skip", "slice", "error")
ON_ROLE_MISMATCH = ("error", "warn", "ignore")
_EMBEDDING_NAMES = {"wte", "wpe", "lm_head", "shared", "decoder", "embed", "embeddings", "tok_embeddings"}
_PROJECTION_NAMES = {"query", "key", "value", "dense", "fc", "c_fc", "c_attn", "c_proj", "q_attn", "linear", "wq",
                     "wk", "wv", "wo", "w", "qkv", "attn", "mlp"}


def role_of(name):
    """The role class of tensor ``name`` read from its module's name: "embedding", "norm", "projection" or
    "other" (see the module docstring)."""
    module = name.rpartition(".")[0].rpartition(".")[2].lower()
    base = re.sub(r"\d+", "", module).rstrip("_")
    if not base:
        return "other"
    if "embed" in base or base in _EMBEDDING_NAMES:
        return "embedding"
    if "norm" in base or base.startswith("ln") or base == "bn":
        return "norm"
    if base.endswith("proj") or base in _PROJECTION_NAMES or "dense" in base:
        return "projection"
    return "other"


def _role_crossings(pairs):
    """["target (role) <- source (role)"] for every pair of two known, different roles."""
    out = []
    for tgt, src in pairs.items():
        a, b = role_of(tgt), role_of(src)
        if a != b and "other" not in (a, b):
            out.append(f"{tgt} ({a}) <- {src} ({b})")
    return out
FALLBACK_STD = 0.02


def initialiser_of(module):
    """The name of ``module``'s own initialiser method (``reset_parameters`` or ``_reset_parameters``), or None."""
    for name in ("reset_parameters", "_reset_parameters"):
        if callable(getattr(module, name, None)):
            return name
    return None


@torch.no_grad()
def fallback_init_(t, local, is_param):
    """Fills ``t`` with the documented fallback for a tensor no initialiser covers; returns its description."""
    if is_param and t.is_floating_point() and t.dim() >= 2:
        t.normal_(0.0, FALLBACK_STD)
        return f"normal(0, {FALLBACK_STD})"
    if is_param and t.dim() == 1 and local == "weight":
        t.fill_(1)
        return "ones"
    t.zero_()
    return "zeros"


def _own(module, local):
    """``module``'s own parameter or buffer ``local`` (not a parametrized or computed attribute)."""
    t = module._parameters.get(local)
    return t if t is not None else module._buffers[local]


def _floating(t):
    return t.is_floating_point() or t.is_complex()


@torch.no_grad()
def _fresh(module, entries):
    """{local name: (fresh tensor, description)} for ``entries`` = [(local name, is_param)] of ``module``.

    Runs the module's initialiser on a deep copy (``module`` itself is not touched)."""
    init = initialiser_of(module)
    twin = None
    if init is not None:
        twin = copy.deepcopy(module)
        for local, _ in entries:
            t = _own(twin, local)
            if _floating(t):
                t.fill_(math.nan)
            else:
                t.zero_()
        getattr(twin, init)()
    out = {}
    for local, is_param in entries:
        if twin is not None:
            t = _own(twin, local).detach()
            if not (_floating(t) and bool(torch.isnan(t).any())):
                out[local] = (t, f"{init} of {type(module).__name__}")
                continue
        t = torch.empty_like(_own(module, local))
        how = fallback_init_(t, local, is_param)
        why = (f"{init} of {type(module).__name__} leaves it unset" if twin is not None
               else f"{type(module).__name__} has no initialiser")
        out[local] = (t, f"{how} ({why})")
    return out


def _kind(t):
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "bool" if t.dtype == torch.bool else "int"


def _fmt_shape(t):
    return tuple(t.shape)


def _split_masks(tensors, is_mask):
    """(plain names in order, {tensor name: mask name}) of a name -> tensor dict."""
    masks = {}
    for key in tensors:
        base = key[: -len(MASK_SUFFIX)] if key.endswith(MASK_SUFFIX) else None
        if base is not None and base in tensors and is_mask(base, key):
            masks[base] = key
    mask_keys = set(masks.values())
    return [k for k in tensors if k not in mask_keys], masks


@dataclasses.dataclass
class _Target:
    key: str
    module: nn.Module
    local: str
    tensor: torch.Tensor
    is_param: bool
    mask_key: str | None = None


def _targets(dst):
    """[_Target] of dst's state_dict, masks folded into their tensors."""
    state = {k: v for k, v in dst.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    resolved = {}
    for key, t in state.items():
        prefix, _, local = key.rpartition(".")
        try:
            module = dst.get_submodule(prefix) if prefix else dst
        except AttributeError:
            module = None
        if module is None or (module._parameters.get(local) is not t and module._buffers.get(local) is not t):
            raise ValueError(f"transfer_parameters: state_dict entry {key!r} of dst is neither a parameter nor a "
                             "buffer of its module (a custom _save_to_state_dict); it cannot be copied into")
        resolved[key] = (module, local)

    def is_mask(base, key):
        module, local = resolved[base]
        return local in pruned_names(module) and resolved[key][0] is module

    names, masks = _split_masks(state, is_mask)
    out = []
    for key in names:
        module, local = resolved[key]
        out.append(_Target(key, module, local, state[key], local in module._parameters, masks.get(key)))
    return out


def _sources(src):
    if isinstance(src, nn.Module):
        state = src.state_dict()
    elif isinstance(src, Mapping):
        state = src
    else:
        raise TypeError(f"transfer_parameters: src must be an nn.Module or a state_dict (a mapping of names to "
                        f"tensors), got {type(src).__name__}")
    tensors = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"transfer_parameters: src's keys must be str, got {k!r}")
        if isinstance(v, torch.Tensor):
            tensors[k] = v.detach()

    def is_mask(base, key):
        return tensors[key].dtype == torch.bool and tensors[key].shape == tensors[base].shape

    names, masks = _split_masks(tensors, is_mask)
    return tensors, names, masks


def _rename(mapping, names, target_names):
    """{source name: target name} after ``mapping``; ValueError listing every problem."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"transfer_parameters: mapping must be a dict {{source pattern: target replacement}}, got "
                        f"{type(mapping).__name__}")
    errors, rules = [], []
    for pattern, replacement in mapping.items():
        if not isinstance(pattern, str) or not isinstance(replacement, str):
            errors.append(f"mapping entry {pattern!r}: {replacement!r} is not a pair of str")
            continue
        try:
            rules.append((pattern, re.compile(pattern), replacement))
        except re.error as e:
            errors.append(f"mapping pattern {pattern!r} is not a valid regular expression ({e})")
    if errors:
        raise ValueError("transfer_parameters: bad mapping:\n  " + "\n  ".join(errors))
    renamed, by, hits = {}, {}, dict.fromkeys([p for p, _, _ in rules], 0)
    for name in names:
        renamed[name] = name
        for pattern, rx, replacement in rules:
            try:
                new, n = rx.subn(replacement, name)
            except (re.error, IndexError) as e:
                errors.append(f"mapping {pattern!r} -> {replacement!r} fails on source {name!r} ({e})")
                break
            if n:
                renamed[name], by[name] = new, pattern
                hits[pattern] += 1
                break
    errors += [f"mapping pattern {p!r} matches no source tensor name" for p, n in hits.items() if n == 0]
    targets = set(target_names)
    for name, pattern in by.items():
        if renamed[name] not in targets:
            errors.append(f"mapping {pattern!r} -> {mapping[pattern]!r} renames source {name!r} to "
                          f"{renamed[name]!r}, which is not a tensor of dst")
    seen = {}
    for name in names:
        seen.setdefault(renamed[name], []).append(name)
    for new, olds in seen.items():
        if len(olds) > 1 and new in targets:
            errors.append(f"sources {', '.join(map(repr, olds))} all map to target {new!r}")
    if errors:
        raise ValueError("transfer_parameters: bad mapping:\n  " + "\n  ".join(errors))
    return renamed


def _pairs_by_name(names, targets, mapping):
    renamed = _rename(mapping, names, [t.key for t in targets]) if mapping else {n: n for n in names}
    by_target = {new: old for old, new in renamed.items()}
    return {t.key: by_target[t.key] for t in targets if t.key in by_target}


def _layers(names):
    """[(first index, end index)] of runs of consecutive names sharing the prefix before their last '.'."""
    runs = []
    for i, name in enumerate(names):
        prefix = name.rpartition(".")[0]
        if runs and runs[-1][2] == prefix:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, prefix])
    return [(a, b) for a, b, _ in runs]


def _pairs_by_order(names, tensors, targets):
    src_t = [tensors[n] for n in names]
    dst_t = [t.tensor for t in targets]
    src_l, dst_l = _layers(names), _layers([t.key for t in targets])

    def sigs(layers, ts, coarse):
        return [tuple((t.dim(), _kind(t)) if coarse else (tuple(t.shape), _kind(t)) for t in ts[a:b])
                for a, b in layers]

    pairs = {}

    def align(ls, ld, coarse):
        a, b = sigs(ls, src_t, coarse), sigs(ld, dst_t, coarse)
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if tag == "equal":
                for (sa, sb), (da, db) in zip(ls[i1:i2], ld[j1:j2]):
                    for i, j in zip(range(sa, sb), range(da, db)):
                        pairs[targets[j].key] = names[i]
            elif tag == "replace" and not coarse:
                align(ls[i1:i2], ld[j1:j2], True)

    align(src_l, dst_l, False)
    return pairs


def _alias_key(t):
    if t.is_meta or t.numel() == 0:
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _conversion(src, dst):
    notes = []
    if src.dtype != dst.dtype:
        notes.append(f"{str(src.dtype).replace('torch.', '')} -> {str(dst.dtype).replace('torch.', '')}")
    if src.device != dst.device:
        notes.append(f"{src.device} -> {dst.device}")
    return ", ".join(notes)


def _slice_text(block):
    return "[" + ", ".join(f":{s.stop}" for s in block) + "]"


@dataclasses.dataclass
class _Plan:
    target: _Target
    source: str | None
    status: str
    detail: str = ""
    block: tuple | None = None  # slices copied from the source (SLICED)
    reinit: bool = False  # needs fresh values for (the rest of) the tensor
    mask: torch.Tensor | None = None  # the source's mask, to apply with the data


def _write(plan, value):
    """Copies ``value`` (or None) into the plan's target and applies or re-applies its mask."""
    tgt = plan.target
    if value is not None:
        tgt.tensor.copy_(value)
    if plan.mask is not None:
        apply_mask(tgt.module, tgt.local, plan.mask)
    elif value is not None and tgt.local in pruned_names(tgt.module):
        sparsity.zero_pruned_(tgt.tensor, tgt.module._buffers[tgt.local + MASK_SUFFIX])


def transfer_parameters(src, dst, mapping=None, *, match="name", on_mismatch="skip", strict=False,
                        reinit_missing=False, on_role_mismatch="error", dry_run=False):
    """Copies ``src``'s tensors (an nn.Module or a state_dict) into ``dst`` (an nn.Module); returns a TransferReport.

    See the module docstring for matching, shape mismatches, re-initialisation, masks and atomicity.
    """
    if match not in MATCHES:
        raise ValueError(f"transfer_parameters: match must be one of {MATCHES}, got {match!r}")
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"transfer_parameters: on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
    if on_role_mismatch not in ON_ROLE_MISMATCH:
        raise ValueError(f"transfer_parameters: on_role_mismatch must be one of {ON_ROLE_MISMATCH}, got "
                         f"{on_role_mismatch!r}")
    if not isinstance(dst, nn.Module):
        raise TypeError(f"transfer_parameters: dst must be an nn.Module, got {type(dst).__name__}")
    if mapping is not None and match != "name":
        raise ValueError("transfer_parameters: mapping renames source tensors for match='name'; it cannot be "
                         f"combined with match={match!r}")
    tensors, names, src_masks = _sources(src)
    targets = _targets(dst)
    meta = [t.key for t in targets if t.tensor.is_meta]
    if meta:
        raise ValueError(f"transfer_parameters: dst tensors {', '.join(meta)} are on the meta device (no memory to "
                         "copy into); materialise dst first, e.g. dst.to_empty(device='cpu')")

    if match == "name":
        pairs = _pairs_by_name(names, targets, mapping)
    else:
        pairs = _pairs_by_order(names, tensors, targets)
        crossings = _role_crossings(pairs) if on_role_mismatch != "ignore" else []
        if crossings:
            what = (f"{len(crossings)} pair(s) of match='order' cross tensor roles (read from names: embedding / "
                    "projection / norm):\n  " + "\n  ".join(crossings))
            if on_role_mismatch == "error":
                raise ValueError(f"transfer_parameters: {what}\nnothing was copied; pair by name with a mapping, or "
                                 "pass on_role_mismatch='warn' or 'ignore' to copy anyway")
            warnings.warn(f"transfer_parameters: {what}", stacklevel=2)

    plans, mismatches = [], []
    for tgt in targets:
        sname = pairs.get(tgt.key)
        if sname is None:
            plans.append(_Plan(tgt, None, MISSING, reinit=reinit_missing))
            continue
        s, t = tensors[sname], tgt.tensor
        mask = tensors[src_masks[sname]] if sname in src_masks and t.is_floating_point() else None
        if s.shape == t.shape:
            plans.append(_Plan(tgt, sname, COPIED, _conversion(s, t), mask=mask))
            continue
        shapes = f"source {_fmt_shape(s)} != target {_fmt_shape(t)}"
        if on_mismatch == "error":
            mismatches.append(f"{tgt.key} {_fmt_shape(t)} <- {sname} {_fmt_shape(s)}")
        elif on_mismatch == "slice" and s.dim() == t.dim():
            block = tuple(slice(0, min(a, b)) for a, b in zip(s.shape, t.shape))
            covered = all(bl.stop == n for bl, n in zip(block, t.shape))
            detail = f"{shapes}; copied source{_slice_text(block)}"
            conv = _conversion(s, t)
            plans.append(_Plan(tgt, sname, SLICED, detail + (f" ({conv})" if conv else ""), block,
                               reinit=not covered, mask=mask))
        else:
            why = shapes + ("; ranks differ, cannot slice" if on_mismatch == "slice" else "")
            why += "; source mask dropped" if mask is not None else ""
            plans.append(_Plan(tgt, sname, REINITIALISED, why, reinit=True))
    if mismatches:
        raise ValueError("transfer_parameters: shape mismatches (on_mismatch='error'):\n  " + "\n  ".join(mismatches))

    # Tied targets: a missing member of a group of targets sharing one tensor is covered by the member with data.
    groups = {}
    for p in plans:
        groups.setdefault(id(p.target.tensor), []).append(p)
    for group in groups.values():
        fed = [p for p in group if p.status != MISSING]
        if fed:
            for p in group:
                if p.status == MISSING:
                    p.status, p.reinit, p.detail = TIED, False, f"same tensor as {fed[0].target.key}"

    used = {p.source for p in plans if p.source is not None}
    used_alias = {_alias_key(tensors[n]) for n in used} - {None}
    unused = []
    for n in names:
        if n in used or _alias_key(tensors[n]) in used_alias:
            continue
        unused.append(n)
        if n in src_masks:
            unused.append(src_masks[n])

    meta_src = sorted({p.source for p in plans if p.source is not None and p.status in (COPIED, SLICED)
                       and tensors[p.source].is_meta})
    if meta_src:
        raise ValueError(f"transfer_parameters: source tensors {', '.join(meta_src)} are on the meta device and "
                         "hold no values to copy")

    report = TransferReport([], unused, match=match, on_mismatch=on_mismatch, dry_run=dry_run)
    if strict:
        problems = []
        for p in plans:
            if p.status in (SLICED, REINITIALISED):
                problems.append(f"target {p.target.key}: {p.status} ({p.detail})")
            elif p.status == MISSING:
                problems.append(f"target {p.target.key}: missing (no source tensor)")
        problems += [f"source {n}: unused" for n in unused]
        if problems:
            raise RuntimeError(f"transfer_parameters(strict=True): {len(problems)} problem(s), nothing was copied:"
                               "\n  " + "\n  ".join(problems))

    # Everything that can fail (user initialisers included) runs before the first write into dst.
    values = {}
    by_module = {}
    for p in plans:
        if p.reinit:
            by_module.setdefault(id(p.target.module), (p.target.module, []))[1].append(p)
    fresh = {}
    for module, ps in by_module.values():
        got = _fresh(module, [(p.target.local, p.target.is_param) for p in ps])
        for p in ps:
            fresh[id(p)] = got[p.target.local]
    with torch.no_grad():
        for p in plans:
            t = p.target.tensor
            if p.status == COPIED:
                values[id(p)] = tensors[p.source]
            elif p.status == SLICED:
                s = tensors[p.source]
                if p.reinit:
                    new, how = fresh[id(p)]
                    new = new.to(device=t.device, dtype=t.dtype).clone()
                    p.detail += f"; rest: {how}"
                else:
                    new = torch.empty_like(t)
                new[p.block].copy_(s[p.block])
                values[id(p)] = new
                if p.mask is not None:
                    m = current_mask(p.target.module, p.target.local).clone()
                    m[p.block] = p.mask[p.block].to(m.device)
                    p.mask = m
            elif p.reinit:
                new, how = fresh[id(p)]
                values[id(p)] = new
                p.detail = (p.detail + "; " if p.detail else "") + how

        for p in plans:
            tgt = p.target
            if not dry_run:
                _write(p, values.get(id(p)))
            report.entries.append(TransferEntry(
                target=tgt.key, source=p.source, status=p.status, detail=p.detail,
                target_shape=_fmt_shape(tgt.tensor),
                source_shape=_fmt_shape(tensors[p.source]) if p.source is not None else None,
                mask=p.mask is not None))
    return report
