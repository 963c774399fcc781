"""Growing and shrinking transformer blocks of ``transformers`` models (and models built like them), keeping the
function where growth allows it exactly.

Every operator takes a model and returns ``(new_model, GrowthReport)``: the input is deep-copied and left
untouched; nnopt.prune masks (``<name>_mask`` buffers) are re-indexed with their weights (new entries kept, i.e.
True); tied weights stay tied (a deep copy keeps them, and no operator touches the embeddings). What to change is
found by ``nnopt.transfer._graph``: the block stack, each block's MLP from a ``torch.fx`` trace (plus one traced
run where the MLP spans two modules, as BERT's), each block's attention projections. Linear layers are
``nn.Linear`` or transformers' ``Conv1D`` (``nnopt.layers``). ``layers``: indices into the block stack (None: all).

- ``widen_mlp(model, new_size, layers=None, noise=0.0)``: Net2WiderNet (Chen et al., 2016) on the intermediate
  features: unit ``j >= n`` replicates a unit ``g(j)`` drawn uniformly; every expander (GPT-2 ``c_fc``, BERT
  ``intermediate.dense``, Llama ``gate_proj`` and ``up_proj``: the same replica in each, so SiLU gating is
  replicated consistently) copies its row and bias entry; the contractor's column ``i`` is divided by the number
  of units computing unit ``i``. The function is unchanged (float rounding aside); ``noise > 0`` adds
  N(0, (noise * std(W))^2) to the replicas' expander rows to break their symmetry, changing it by the reported
  deviation.
- ``narrow_mlp(model, new_size, layers=None, importance="magnitude")``: keeps the ``new_size`` most important
  intermediate units; ``"magnitude"`` scores unit ``j`` by the product of the L2 norms of its expander rows and
  its contractor column (a bound on how much it can move the output per unit input); ``"taylor"`` (needs
  ``data=``: model inputs with labels) the first-order estimate of the loss change when the unit is removed,
  |sum over a sequence's tokens of a_j dL/da_j| summed over sequences (Molchanov et al., 2019; a_j: the unit's
  input to the contractor); ``"random"``; or a callable ``importance(model, mlp) -> [width]`` tensor (higher =
  kept).
- ``add_heads(model, n, layers=None, by="query")``: ``n`` new query heads per block. With one key-value head per
  query head (GPT-2, BERT, MHA Llama) each new head gets new q/k/v rows; with grouped-query attention the new
  query heads are spread evenly over the existing key-value groups (``n`` a multiple of the number of groups; the
  kv projections are unchanged), or, ``by="group"``, ``n`` new key-value heads come with a full group of query
  heads each. New q/k/v rows are drawn N(0, std of the existing rows) (biases 0); the new heads' columns of
  the output projection are zero, so the function is unchanged.
- ``remove_heads(model, n, layers=None, by="query", importance="magnitude")``: removes the ``n`` least important
  query heads per block (with GQA: ``n / groups`` from each group, keeping groups equal), or, ``by="group"``, the
  ``n`` least important key-value groups with their query heads (a group scores the sum of its heads).
  ``"magnitude"``: the Frobenius norm of the head's value-output map ``W_o[:, head] @ W_v[head]`` (attention
  weights sum to one, so this bounds the head's output per unit input); ``"taylor"`` (needs ``data=``) the
  head-gate gradient importance of Michel et al. (2019), |dL/d gate_h| per sequence summed; ``"random"``; or a
  callable ``importance(model, attention) -> [heads]``.
- ``insert_block(model, index)``: a new block at position ``index`` (0 to the number of blocks) that is a copy of
  its predecessor (of block 0 at index 0) with zeroed output projections (attention output and MLP contractor,
  weights and biases): in a pre-norm block (GPT-2, Llama: ``x + f(norm(x))``) it is the identity. In a post-norm
  block (BERT: ``norm(x + f(x))``) it computes ``norm2(norm1(x))``, which is the identity only when ``x`` is
  already a normalised vector with unit scale and zero shift; the report gives the measured deviation. Every
  block's ``layer_idx`` (KV cache slot) is renumbered and ``config.num_hidden_layers`` (and ``layer_types``) kept
  consistent.

Config. ``config.intermediate_size`` (GPT-2: ``n_inner``) and ``config.num_attention_heads`` /
``num_key_value_heads`` follow when every block ends with the same size; otherwise they are left and the report
says the model can no longer be rebuilt from its config. GPT-2 and BERT derive the head size from
``hidden_size / num_attention_heads``: once the head count changes at constant hidden size, the modules keep
their head size but ``from_config`` would build another one (the report says so); Llama's config carries
``head_dim`` and stays exact.

Report. ``GrowthReport``: ``operation``, ``changes`` (one line per changed block), ``config`` (fields set),
``notes`` and the deviation of the model's output (``logits``, or the first tensor it returns) on ``probe``
(default: the model's ``dummy_inputs``) in eval mode: ``max_abs_deviation`` and ``relative_deviation`` (divided
by the largest output magnitude). Bad input (a size that does not grow or shrink, more heads than exist, an index
out of range, a model whose MLP cannot be traced) raises ValueError (``GraphError``) naming the layer, before
anything is copied.
"""

import copy
import dataclasses
import numbers

import torch
from torch import nn

from nnopt import sparsity
from nnopt.layers import in_out_features, is_conv1d, weight_as_linear
from nnopt.prune._contract import apply_mask, current_mask, pruned_names, relink, remove_mask
from nnopt.transfer._graph import GraphError, block_names, find_attention, find_mlp, find_stack, run_model

__all__ = ["GraphError", "GrowthReport", "add_heads", "insert_block", "narrow_mlp", "remove_heads", "widen_mlp"]

IMPORTANCES = ("magnitude", "taylor", "random")


@dataclasses.dataclass
class GrowthReport:
    """What an operator did; ``str()`` prints it."""

    operation: str
    changes: list
    config: dict
    notes: list
    max_abs_deviation: float
    relative_deviation: float
    probe: str

    def __str__(self):
        lines = [f"{self.operation}:"] + [f"  {c}" for c in self.changes]
        if self.config:
            lines.append("  config: " + ", ".join(f"{k}={v}" for k, v in self.config.items()))
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  output change on {self.probe}: max |diff| {self.max_abs_deviation:.3g} "
                     f"(relative {self.relative_deviation:.3g})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- tensor surgery
def _replace(module, name, value, mask):
    """Sets parameter ``module.<name>`` to ``value`` (requires_grad kept); ``mask`` (or None) becomes its mask."""
    old = module._parameters[name]
    if name in pruned_names(module):
        remove_mask(module, name)
    module._parameters[name] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    if mask is not None:
        apply_mask(module, name, mask.contiguous())


def _gather(t, dim, idx, fill):
    """``t`` indexed by ``idx`` along ``dim``; positions with ``idx < 0`` take ``fill`` (a tensor of the new
    entries, stacked along ``dim``, or a scalar)."""
    out = t.index_select(dim, idx.clamp(min=0)).clone()
    new = (idx < 0).nonzero().flatten()
    if new.numel():
        if isinstance(fill, torch.Tensor):
            out.index_copy_(dim, new, fill.to(out.dtype))
        else:
            out.index_fill_(dim, new, fill)
    return out


@torch.no_grad()
def _remap_out(module, idx, new_rows=None):
    """Output features of a linear layer become old features ``idx`` (-1: new; rows ``new_rows`` [k, in] or 0)."""
    idx = idx.to(module.weight.device)
    w = weight_as_linear(module).detach()
    neww = _gather(w, 0, idx, new_rows if new_rows is not None else 0.0)
    pruned = "weight" in pruned_names(module)
    mask = _gather(current_mask(module, "weight").t() if is_conv1d(module) else current_mask(module, "weight"),
                   0, idx, True) if pruned else None
    _store(module, neww, mask)
    if module.bias is not None:
        bmask = _gather(current_mask(module, "bias"), 0, idx, True) if "bias" in pruned_names(module) else None
        _replace(module, "bias", _gather(module.bias.detach(), 0, idx, 0.0), bmask)
    _set_features(module)


@torch.no_grad()
def _remap_in(module, idx, scale=None):
    """Input features of a linear layer become old features ``idx`` (-1: new, zero columns), times ``scale``."""
    idx = idx.to(module.weight.device)
    w = weight_as_linear(module).detach()
    neww = _gather(w, 1, idx, 0.0)
    if scale is not None:
        neww.mul_(scale.to(device=neww.device, dtype=neww.dtype))
    pruned = "weight" in pruned_names(module)
    mask = _gather(current_mask(module, "weight").t() if is_conv1d(module) else current_mask(module, "weight"),
                   1, idx, True) if pruned else None
    _store(module, neww, mask)
    _set_features(module)


def _store(module, w_linear, mask_linear):
    if is_conv1d(module):
        _replace(module, "weight", w_linear.t(), None if mask_linear is None else mask_linear.t())
    else:
        _replace(module, "weight", w_linear, mask_linear)


def _set_features(module):
    i, o = in_out_features(module)
    if is_conv1d(module):
        module.nx, module.nf = i, o
    else:
        module.in_features, module.out_features = i, o


@torch.no_grad()
def _zero_output(module):
    module.weight.zero_()
    if module.bias is not None:
        module.bias.zero_()


# ----------------------------------------------------------------------------------------------- shared steps
def _check_int(what, name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{what}: {name} must be >= {low}, got {value}")


def _probe(model, probe):
    if probe is not None:
        return probe, "the given probe"
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict):
        return dummy, f"dummy_inputs ({', '.join(f'{k} {tuple(v.shape)}' for k, v in dummy.items())})"
    raise GraphError(f"probe= is needed to measure how the output of {type(model).__name__} changes (it has no "
                     "dummy_inputs)")


def _output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for x in out:
            if isinstance(x, torch.Tensor):
                return x
    raise TypeError(f"the model's output ({type(out).__name__}) holds no tensor to compare")


@torch.no_grad()
def _evaluate(model, probe):
    was = model.training
    model.eval()
    try:
        return _output_tensor(run_model(model, probe)).detach().double()
    finally:
        model.train(was)


def _copy(model):
    new = copy.deepcopy(model)
    relink(new)
    return new


def _finish(operation, model, new, probe, changes, config, notes):
    x, where = _probe(model, probe)
    before, after = _evaluate(model, x), _evaluate(new, x)
    if before.shape[:-1] == after.shape[:-1] and after.shape[-1] > before.shape[-1]:
        # a model that outputs its hidden states (no head) after widen_hidden: the first features are the old ones
        where += f", compared on the first {before.shape[-1]} of {after.shape[-1]} output features"
        after = after[..., :before.shape[-1]]
    if before.shape != after.shape:
        raise RuntimeError(f"{operation}: the output shape changed from {tuple(before.shape)} to {tuple(after.shape)}")
    diff = float((after - before).abs().max()) if before.numel() else 0.0
    scale = float(before.abs().max()) if before.numel() else 0.0
    return new, GrowthReport(operation, changes, config, notes, diff, diff / scale if scale else diff, where)


def _set_config(model, fields, sizes, notes, what):
    """Sets config ``fields`` to the common size of ``sizes`` (per block), or notes why not."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    values = set(sizes)
    if len(values) != 1:
        notes.append(f"blocks now differ in {what} ({sizes}); config left as is, so the model cannot be rebuilt "
                     "from its config")
        return {}
    value = values.pop()
    done = {}
    for f in fields:
        if hasattr(config, f):
            setattr(config, f, value)
            done[f] = value
    return done


def _all_blocks(new, changed, notes, what, update):
    """``update()`` (the config fields it set) when every block changed, else a note that the config is stale."""
    total = len(find_stack(new)[1])
    if changed == total:
        return update()
    if getattr(new, "config", None) is not None:
        notes.append(f"{changed} of {total} blocks changed: their {what} differs from the other blocks' and the "
                     "config's, so the model cannot be rebuilt from its config")
    return {}


def _mlps(model, layers, what, example_inputs):
    return [find_mlp(model, b, example_inputs) for b in block_names(model, layers, what)]


# --------------------------------------------------------------------------------------------------- MLP width
_MLP_FIELDS = ("intermediate_size", "n_inner")


def widen_mlp(model, new_size, layers=None, *, noise=0.0, generator=None, probe=None, example_inputs=None):
    """Net2WiderNet on the intermediate features of each MLP in ``layers``: ``(new_model, GrowthReport)``."""
    what = "widen_mlp"
    _check_int(what, "new_size", new_size, 1)
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not noise >= 0:
        raise ValueError(f"{what}: noise must be a number >= 0, got {noise!r}")
    mlps = _mlps(model, layers, what, example_inputs)
    for mlp in mlps:
        if new_size <= mlp.width:
            raise ValueError(f"{what}: new_size={new_size} must be larger than the intermediate size {mlp.width} of "
                             f"{mlp.traced!r} (use narrow_mlp to shrink)")
    new = _copy(model)
    changes, sizes, notes = [], [], []
    for mlp in mlps:
        n = mlp.width
        g = torch.cat([torch.arange(n), torch.randint(0, n, (new_size - n,), generator=generator)])
        counts = torch.bincount(g, minlength=n).double()
        for e in mlp.expanders:
            lin = new.get_submodule(e)
            _remap_out(lin, g)
            if noise > 0:
                _perturb_rows(lin, n, noise, generator)
        _remap_in(new.get_submodule(mlp.contractor), g, (1.0 / counts)[g])
        sizes.append(new_size)
        changes.append(f"{mlp.traced}: {n} -> {new_size} units ({', '.join(mlp.expanders)} -> {mlp.contractor}"
                       f"{', found by a traced run' if mlp.observed else ''})")
    config = _all_blocks(new, len(mlps), notes, "intermediate size",
                         lambda: _set_config(new, _MLP_FIELDS, sizes, notes, "intermediate size"))
    if noise > 0:
        notes.append(f"noise {noise:g} on the replicas' expander rows changes the function")
    return _finish(what, model, new, probe, changes, config, notes)


@torch.no_grad()
def _perturb_rows(lin, n, noise, generator):
    """Adds N(0, (noise * std(W))^2) to the weight rows of output features ``n:`` (pruned entries stay zero)."""
    w = weight_as_linear(lin)
    std = float(w[:n].double().std()) if w[:n].numel() > 1 else 0.0
    eps = torch.randn(w.shape[0] - n, w.shape[1], generator=generator, dtype=torch.float64)
    w[n:] += (eps * (noise * std if std > 0 else noise)).to(w.device, w.dtype)
    if "weight" in pruned_names(lin):
        sparsity.zero_pruned_(lin.weight, lin._buffers["weight_mask"])


def _taylor(model, layers, data):
    """{layer name: [sequences, in_features] sums over tokens of x * dL/dx}, x the input of each linear layer in
    ``layers``, over the batches ``data`` (dicts of model inputs whose forward returns ``.loss``). Gradients go to
    the captured inputs only (torch.autograd.grad): the model's parameters get no ``.grad``."""
    if data is None:
        raise ValueError("importance='taylor' needs data=: a dict of model inputs (labels included, so the forward "
                         "returns a loss) or a list of them")
    batches = [data] if isinstance(data, dict) else list(data)
    out = {name: [] for name in layers}
    was = model.training
    model.eval()
    try:
        for batch in batches:
            seen, handles = {}, []
            for name in layers:
                def grab(m, args, name=name):
                    seen[name] = args[0]
                handles.append(model.get_submodule(name).register_forward_pre_hook(grab))
            try:
                with torch.enable_grad():
                    res = run_model(model, batch)
                    loss = getattr(res, "loss", None)
                    if not isinstance(loss, torch.Tensor):
                        raise TypeError(f"importance='taylor': the model's output ({type(res).__name__}) has no loss; "
                                        "pass labels in data")
                    names = [n for n in layers if n in seen and seen[n].requires_grad]
                    if len(names) != len(layers):
                        missing = sorted(set(layers) - set(names))
                        raise GraphError(f"importance='taylor': {missing} did not run on a tensor that requires grad")
                    grads = torch.autograd.grad(loss, [seen[n] for n in names])
            finally:
                for h in handles:
                    h.remove()
            for n, g in zip(names, grads):
                x = seen[n].detach()
                prod = (x * g).double()
                out[n].append(prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1).cpu())
    finally:
        model.train(was)
    return {n: torch.cat(v) for n, v in out.items()}


def _mlp_scores(model, mlp, importance, generator, taylor):
    if importance == "taylor":  # Molchanov et al. 2019: |sum over tokens of a_j dL/da_j| per sequence, summed
        return taylor[mlp.contractor].abs().sum(0)
    if importance == "random":
        return torch.rand(mlp.width, generator=generator, dtype=torch.float64)
    if importance == "magnitude":
        s = torch.ones(mlp.width, dtype=torch.float64)
        for e in mlp.expanders:
            s *= torch.linalg.vector_norm(weight_as_linear(model.get_submodule(e)).detach().double(), dim=1).cpu()
        c = weight_as_linear(model.get_submodule(mlp.contractor)).detach().double()
        return s * torch.linalg.vector_norm(c, dim=0).cpu()
    if callable(importance):
        s = importance(model, mlp)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (mlp.width,):
            raise ValueError(f"importance must return a tensor of shape ({mlp.width},) for {mlp.traced!r}, got "
                             f"{getattr(s, 'shape', type(s).__name__)}")
        return s.detach().double().cpu()
    raise ValueError(f"importance must be one of {IMPORTANCES} or a callable, got {importance!r}")


def narrow_mlp(model, new_size, layers=None, *, importance="magnitude", data=None, generator=None, probe=None,
               example_inputs=None):
    """Keeps the ``new_size`` most important intermediate units of each MLP: ``(new_model, GrowthReport)``."""
    what = "narrow_mlp"
    _check_int(what, "new_size", new_size, 1)
    mlps = _mlps(model, layers, what, example_inputs)
    for mlp in mlps:
        if new_size >= mlp.width:
            raise ValueError(f"{what}: new_size={new_size} must be smaller than the intermediate size {mlp.width} of "
                             f"{mlp.traced!r} (use widen_mlp to grow)")
    keeps = []
    taylor = _taylor(model, [m.contractor for m in mlps], data) if importance == "taylor" else None
    for mlp in mlps:
        scores = _mlp_scores(model, mlp, importance, generator, taylor)
        order = torch.sort(scores, descending=True, stable=True).indices
        keeps.append(torch.sort(order[:new_size]).values)
    new = _copy(model)
    changes, sizes, notes = [], [], []
    for mlp, keep in zip(mlps, keeps):
        for e in mlp.expanders:
            _remap_out(new.get_submodule(e), keep)
        _remap_in(new.get_submodule(mlp.contractor), keep)
        sizes.append(new_size)
        how = getattr(importance, "__name__", importance)
        changes.append(f"{mlp.traced}: {mlp.width} -> {new_size} units by {how}")
    config = _all_blocks(new, len(mlps), notes, "intermediate size",
                         lambda: _set_config(new, _MLP_FIELDS, sizes, notes, "intermediate size"))
    return _finish(what, model, new, probe, changes, config, notes)


# ------------------------------------------------------------------------------------------------------ heads
_HEAD_FIELDS = ("num_heads", "num_attention_heads")
_KV_FIELDS = ("num_key_value_heads",)


def _features(heads, d):
    """Feature index of head list ``heads`` (old numbering; -1 for a new head), ``d`` features per head."""
    return torch.tensor([h * d + j if h >= 0 else -1 for h in heads for j in range(d)], dtype=torch.long)


def _apply_heads(new, att, q_heads, kv_heads, generator):
    """Rebuilds ``att`` in ``new`` with query heads ``q_heads`` and key-value heads ``kv_heads`` (None: unchanged),
    old numbering with -1 for new heads; returns (query heads, key-value heads) counts."""
    q_idx = _features(q_heads, att.head_dim)
    kv_idx = None if kv_heads is None else _features(kv_heads, att.head_dim)
    _retarget_qkv(new, att, q_idx, kv_idx, generator)
    _remap_in(new.get_submodule(att.o), q_idx)
    counts = (len(q_heads), att.kv_heads if kv_heads is None else len(kv_heads))
    _set_heads(new, att, *counts)
    return counts


def _set_heads(new, att, heads, kv_heads):
    m = new.get_submodule(att.module)
    if hasattr(m, "num_heads"):
        m.num_heads = heads
    if hasattr(m, "num_attention_heads"):
        m.num_attention_heads = heads
    if hasattr(m, "split_size"):
        m.split_size = heads * att.head_dim
    if hasattr(m, "all_head_size"):
        m.all_head_size = heads * att.head_dim
    if hasattr(m, "num_key_value_groups"):
        m.num_key_value_groups = heads // kv_heads


def _new_rows(lin, k, generator):
    w = weight_as_linear(lin).detach()
    std = float(w.double().std()) if w.numel() > 1 else 0.02
    return (torch.randn(k, w.shape[1], generator=generator, dtype=torch.float64) * std).to(w.device, w.dtype)


def _retarget_qkv(new, att, q_idx, kv_idx, generator):
    """Re-indexes q (and k/v when ``kv_idx`` is not None) output features; new rows drawn like the old ones."""
    if att.qkv is not None:
        lin = new.get_submodule(att.qkv)
        width = att.heads * att.head_dim
        parts = [q_idx, q_idx, q_idx]
        idx = torch.cat([torch.where(p >= 0, p + i * width, p) for i, p in enumerate(parts)])
        k = int((idx < 0).sum())
        _remap_out(lin, idx, _new_rows(lin, k, generator) if k else None)
        return
    targets = [(att.q, q_idx)] + ([(att.k, kv_idx), (att.v, kv_idx)] if kv_idx is not None else [])
    for name, idx in targets:
        lin = new.get_submodule(name)
        k = int((idx < 0).sum())
        _remap_out(lin, idx, _new_rows(lin, k, generator) if k else None)


def _attentions(model, layers, what):
    return [find_attention(model, b) for b in block_names(model, layers, what)]


def _head_config(new, atts_after, notes):
    heads = [h for h, _ in atts_after]
    kv = [k for _, k in atts_after]
    config = _set_config(new, _HEAD_FIELDS, heads, notes, "head count")
    if config:
        config.update(_set_config(new, _KV_FIELDS, kv, notes, "key-value head count"))
        cfg = new.config
        if getattr(cfg, "head_dim", None) is None and hasattr(cfg, "hidden_size"):
            notes.append("this config derives the head size from hidden_size / num_attention_heads, which no longer "
                         "holds: the modules keep their head size, but from_config would build another model")
    return config


def add_heads(model, n, layers=None, *, by="query", generator=None, probe=None):
    """``n`` new attention heads per block (zero output projection: function unchanged): ``(new_model, report)``.

    ``by="query"``: ``n`` query heads (with GQA spread over the existing key-value groups); ``by="group"``: ``n``
    new key-value heads, each with a full group of new query heads (the same as "query" without GQA)."""
    what = "add_heads"
    _check_int(what, "n", n, 1)
    _check_by(what, by)
    atts = _attentions(model, layers, what)
    for att in atts:
        if by == "query" and att.kv_heads != att.heads and n % att.kv_heads:
            raise ValueError(f"{what}: n={n} new query heads cannot be spread evenly over the {att.kv_heads} key-value "
                             f"groups of {att.module!r} (grouped-query attention); use a multiple of {att.kv_heads} "
                             "or by='group'")
    new = _copy(model)
    changes, after, notes = [], [], []
    for att in atts:
        old_q, old_kv = list(range(att.heads)), list(range(att.kv_heads))
        if att.kv_heads == att.heads:
            q = kv = old_q + [-1] * n
        elif by == "group":
            q, kv = old_q + [-1] * (n * att.groups), old_kv + [-1] * n
        else:
            per = n // att.kv_heads
            q = [h for g in old_kv for h in old_q[g * att.groups:(g + 1) * att.groups] + [-1] * per]
            kv = None
        heads, kv_heads = _apply_heads(new, att, q, kv, generator)
        after.append((heads, kv_heads))
        changes.append(f"{att.module}: {att.heads} -> {heads} query heads, {att.kv_heads} -> {kv_heads} key-value "
                       f"heads (head size {att.head_dim}; new heads' {att.o} columns zero)")
    config = _all_blocks(new, len(atts), notes, "head count", lambda: _head_config(new, after, notes))
    return _finish(what, model, new, probe, changes, config, notes)


def _check_by(what, by):
    if by not in ("query", "group"):
        raise ValueError(f"{what}: by must be 'query' or 'group', got {by!r}")


def _head_scores(model, att, importance, generator, taylor):
    if importance == "taylor":  # Michel et al. 2019: |dL/d(head gate)| per sequence, summed
        per = taylor[att.o]
        return per.reshape(per.shape[0], att.heads, att.head_dim).sum(-1).abs().sum(0)
    if importance == "random":
        return torch.rand(att.heads, generator=generator, dtype=torch.float64)
    if importance == "magnitude":
        d = att.head_dim
        o = weight_as_linear(model.get_submodule(att.o)).detach().double()
        if att.qkv is not None:
            v = weight_as_linear(model.get_submodule(att.qkv)).detach().double()[2 * att.heads * d:]
        else:
            v = weight_as_linear(model.get_submodule(att.v)).detach().double()
        scores = []
        for h in range(att.heads):
            kv = h // att.groups
            scores.append(torch.linalg.matrix_norm(o[:, h * d:(h + 1) * d] @ v[kv * d:(kv + 1) * d]))
        return torch.stack(scores).cpu()
    if callable(importance):
        s = importance(model, att)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (att.heads,):
            raise ValueError(f"importance must return a tensor of shape ({att.heads},) for {att.module!r}, got "
                             f"{getattr(s, 'shape', type(s).__name__)}")
        return s.detach().double().cpu()
    raise ValueError(f"importance must be one of {IMPORTANCES} or a callable, got {importance!r}")


def remove_heads(model, n, layers=None, *, by="query", importance="magnitude", data=None, generator=None,
                 probe=None):
    """Removes the ``n`` least important heads per block: ``(new_model, GrowthReport)``.

    ``by="query"``: ``n`` query heads (with GQA ``n / groups`` from each key-value group, keeping groups equal);
    ``by="group"``: ``n`` key-value heads with their query heads, a group scored by the sum of its heads'."""
    what = "remove_heads"
    _check_int(what, "n", n, 1)
    _check_by(what, by)
    atts = _attentions(model, layers, what)
    for att in atts:
        mha = att.kv_heads == att.heads
        if (by == "query" or mha) and n >= att.heads:
            raise ValueError(f"{what}: cannot remove {n} heads from {att.module!r}, which has {att.heads}; at least "
                             "one must stay")
        if by == "group" and not mha and n >= att.kv_heads:
            raise ValueError(f"{what}: cannot remove {n} key-value groups from {att.module!r}, which has "
                             f"{att.kv_heads}; at least one must stay")
        if by == "query" and not mha and (n % att.kv_heads or n // att.kv_heads >= att.groups):
            raise ValueError(f"{what}: n={n} must be a multiple of the {att.kv_heads} key-value groups of "
                             f"{att.module!r} (grouped-query attention, {att.groups} query heads each), below "
                             f"{att.heads}; or remove whole groups with by='group'")
    plans = []
    taylor = _taylor(model, [a.o for a in atts], data) if importance == "taylor" else None
    for att in atts:
        scores = _head_scores(model, att, importance, generator, taylor)
        if att.kv_heads == att.heads:
            q = kv = _top(scores, att.heads - n)
        elif by == "group":
            kv = _top(scores.reshape(att.kv_heads, att.groups).sum(1), att.kv_heads - n)
            q = [g * att.groups + j for g in kv for j in range(att.groups)]
        else:
            per = att.groups - n // att.kv_heads
            q = [g * att.groups + j for g in range(att.kv_heads)
                 for j in _top(scores[g * att.groups:(g + 1) * att.groups], per)]
            kv = None
        plans.append((att, q, kv))
    new = _copy(model)
    changes, after, notes = [], [], []
    for att, q, kv in plans:
        heads, kv_heads = _apply_heads(new, att, q, kv, generator)
        after.append((heads, kv_heads))
        gone = sorted(set(range(att.heads)) - set(q))
        changes.append(f"{att.module}: removed heads {gone} by {getattr(importance, '__name__', importance)} "
                       f"({att.heads} -> {heads} query heads, {att.kv_heads} -> {kv_heads} key-value heads)")
    config = _all_blocks(new, len(atts), notes, "head count", lambda: _head_config(new, after, notes))
    return _finish(what, model, new, probe, changes, config, notes)


def _top(scores, k):
    """The indices of the ``k`` highest scores, ties to the lower index, in increasing order."""
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())


# ------------------------------------------------------------------------------------------------------ depth
def _renumber(stack):
    for i, block in enumerate(stack):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i


def insert_block(model, index, *, probe=None, example_inputs=None):
    """A new block at ``index`` of the stack, identity at insertion (pre-norm blocks): ``(new_model, report)``."""
    what = "insert_block"
    stack_name, stack = find_stack(model)
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise TypeError(f"{what}: index must be an int, got {type(index).__name__}")
    if not 0 <= index <= len(stack):
        raise GraphError(f"{what}: index {index} out of range for {stack_name!r}: 0 to {len(stack)} (its number of "
                         "blocks)")
    src = max(index - 1, 0)
    block = f"{stack_name}.{src}"
    mlp = find_mlp(model, block, example_inputs)
    att = find_attention(model, block)
    new = _copy(model)
    new_stack = new.get_submodule(stack_name)
    template = new_stack[src]
    shared = {id(v): v for m in template.modules() for v in vars(m).values()
              if type(v).__name__.endswith("Config")}  # the model's config stays one object
    fresh = copy.deepcopy(template, memo=dict(shared))
    relink(fresh)
    rel = len(block) + 1
    for name in (att.o, mlp.contractor):
        _zero_output(fresh.get_submodule(name[rel:]))
    new_stack.insert(index, fresh)
    _renumber(new_stack)
    notes, config = [], {}
    if any(getattr(m, "scale_attn_by_inverse_layer_idx", False) for m in fresh.modules()):
        notes.append("attention scales by 1 / (layer_idx + 1) here: every block keeps the scale it was built with "
                     "(set from its old index), so from_config would build other scales")
    cfg = getattr(new, "config", None)
    if cfg is not None:
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(new_stack)
            config["num_hidden_layers"] = len(new_stack)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == len(stack):
            cfg.layer_types = types[:index] + [types[src]] + types[index:]
            config["layer_types"] = cfg.layer_types
    moved = f"; blocks {index}..{len(stack) - 1} moved up by one (layer_idx renumbered)" if index < len(stack) else ""
    change = (f"{stack_name}.{index}: new {type(fresh).__name__}, a copy of block {src} with {att.o[rel:]} and "
              f"{mlp.contractor[rel:]} zeroed{moved}")
    new_out, report = _finish(what, model, new, probe, [change], config, notes)
    if report.max_abs_deviation > 0:
        report.notes.append("the new block is not an exact identity: in a post-norm block (norm(x + f(x)), BERT) its "
                            "norms still act on x")
    return new_out, report
