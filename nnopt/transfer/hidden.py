"""``widen_hidden(model, new_size)``: a wider residual stream (embedding width) for a transformer, initialised as
bert2BERT's function-preserving initialisation (Chen et al., 2022) does, exact where exactness is possible.

Feature ``i`` of the new stream (width D) copies feature ``g(i)`` of the old one (width d): ``g(i) = i mod d`` for
the first ``d * (D // d)`` features, so every old feature has the same number of copies, and uniform draws for the
``D mod d`` others. Then, for a hidden state ``h`` the new model carries ``h[g]``:

- embeddings (``nn.Embedding`` of width d: tokens, positions, token types) copy their columns by ``g``;
- the layers that write into the stream (each block's attention output projection and MLP contractor, and the
  linear layers outside the blocks with d outputs) copy their output rows and biases by ``g``;
- the layers that read it (q/k/v, MLP expanders, and the linear layers outside the blocks with d inputs: LM
  heads, BERT's prediction transform, poolers) take column ``g(i)`` times ``λ_i``, with ``λ`` summing to 1 over
  the copies of each feature (``split="even"``: 1 / copies; ``"random"``: random positive shares, which break the
  symmetry between copies so they can learn apart; the function is the same either way);
- norms over the stream (LayerNorm, RMSNorm: any module with a 1-D ``weight`` of width d) copy their scale and
  shift by ``g``. With every feature copied equally often (D a multiple of d) the mean and variance over the new
  stream equal the old ones, so LayerNorm and RMSNorm are exact; otherwise they are approximate and the report
  gives the measured change;
- a tied output embedding (the LM head shares the token embedding, which copies columns) reads the stream through
  its final norm, whose scale and shift take the shares ``λ`` instead.

Heads keep their number and size (q/k/v outputs are unchanged), so ``heads * head_dim`` no longer equals the
hidden size: GPT-2 and BERT, whose configs derive the head size from it, cannot be rebuilt from their config (the
report says so); ``config.hidden_size`` is set to D (Llama's ``head_dim`` is kept explicit). Returns
``(new_model, GrowthReport)``; the input is untouched, masks are re-indexed with their tensors, ties stay tied.
"""

import torch
from torch import nn

from nnopt.layers import in_out_features, is_linear_like
from nnopt.prune._contract import current_mask, pruned_names
from nnopt.transfer._graph import block_names, find_attention, find_mlp, find_stack
from nnopt.transfer.grow import _check_int, _copy, _finish, _gather, _remap_in, _remap_out, _replace

__all__ = ["widen_hidden"]

SPLITS = ("even", "random")
_SIZE_ATTRS = ("hidden_size", "embed_dim", "n_embd", "embedding_dim")


def _index(d, new, generator):
    reps = new // d
    g = torch.arange(d * reps) % d
    if new > d * reps:
        g = torch.cat([g, torch.randint(0, d, (new - d * reps,), generator=generator)])
    return g


def _shares(g, d, split, generator):
    counts = torch.bincount(g, minlength=d).double()
    if split == "even":
        return (1.0 / counts)[g]
    u = torch.rand(g.numel(), generator=generator, dtype=torch.float64) + 0.5  # shares within [1/3, 3] of even
    total = torch.zeros(d, dtype=torch.float64).index_add_(0, g, u)
    return u / total[g]


@torch.no_grad()
def _remap_param(module, name, dim, g, scale=None):
    t = module._parameters[name]
    value = _gather(t.detach(), dim, g.to(t.device), 0.0)
    if scale is not None:
        shape = [1] * value.dim()
        shape[dim] = -1
        value.mul_(scale.to(value.device, value.dtype).reshape(shape))
    mask = _gather(current_mask(module, name), dim, g.to(t.device), True) if name in pruned_names(module) else None
    _replace(module, name, value, mask)


def _norms(model, d):
    return [(n, m) for n, m in model.named_modules() if not is_linear_like(m) and not isinstance(m, nn.Embedding)
            and isinstance(m._parameters.get("weight"), torch.Tensor) and tuple(m.weight.shape) == (d,)]


def widen_hidden(model, new_size, *, split="even", generator=None, probe=None, example_inputs=None):
    """Widens the residual stream of ``model`` to ``new_size`` features (see the module docstring)."""
    what = "widen_hidden"
    _check_int(what, "new_size", new_size, 1)
    if split not in SPLITS:
        raise ValueError(f"{what}: split must be one of {SPLITS}, got {split!r}")
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise ValueError(f"{what}: {type(model).__name__} has no nn.Embedding whose width is the hidden size")
    d = embeddings[0][1].embedding_dim
    if new_size <= d:
        raise ValueError(f"{what}: new_size={new_size} must be larger than the hidden size {d} (the width of "
                         f"{embeddings[0][0]!r})")
    stack_name, _ = find_stack(model)
    readers, writers = [], []
    for block in block_names(model, None, what):
        mlp, att = find_mlp(model, block, example_inputs), find_attention(model, block)
        readers += mlp.expanders + ([att.qkv] if att.qkv else [att.q, att.k, att.v])
        writers += [att.o, mlp.contractor]
        for name in (att.o, mlp.contractor):
            if in_out_features(model.get_submodule(name))[1] != d:
                raise ValueError(f"{what}: {name!r} writes {in_out_features(model.get_submodule(name))[1]} features "
                                 f"into the residual stream, not the hidden size {d}")
    inside = set(readers) | set(writers)
    emb_weights = {id(m.weight) for _, m in embeddings if m.embedding_dim == d}
    tied_heads = []
    for name, m in model.named_modules():
        if not is_linear_like(m) or name in inside or name.startswith(stack_name + "."):
            continue
        i, o = in_out_features(m)
        if id(m.weight) in emb_weights:
            tied_heads.append(name)
            continue
        if i == d:
            readers.append(name)
        if o == d:
            writers.append(name)
    norms = _norms(model, d)
    final = None
    if tied_heads:
        # the norm that runs last before the head, in registration order (ln_f, model.norm, the MLM transform's)
        order = [n for n, _ in model.named_modules()]
        head_at = order.index(tied_heads[0])
        before = [n for n, _ in norms if order.index(n) < head_at]
        if not before:
            raise ValueError(f"{what}: the tied output embedding {tied_heads[0]!r} reads the stream without a norm "
                             "before it; its shares cannot be folded anywhere exact")
        final = before[-1]

    g = _index(d, new_size, generator)
    lam = _shares(g, d, split, generator)
    new = _copy(model)
    for name in writers:
        m = new.get_submodule(name)
        _remap_out(m, g)
    for name in readers:
        _remap_in(new.get_submodule(name), g, lam)
    done = set()
    for name, _ in embeddings:
        m = new.get_submodule(name)
        if m.embedding_dim != d or id(m.weight) in done:
            continue
        old = m.weight
        _remap_param(m, "weight", 1, g)
        m.embedding_dim = new_size
        done.add(id(m.weight))
        for other in new.modules():  # re-tie every module that shared the old tensor (LM heads)
            for pname, p in list(other._parameters.items()):
                if p is old:
                    other._parameters[pname] = m.weight
    for name, _ in norms:
        m = new.get_submodule(name)
        scale = lam if name == final else None
        for pname in ("weight", "bias"):
            if isinstance(m._parameters.get(pname), torch.Tensor):
                _remap_param(m, pname, 0, g, scale)
        if isinstance(getattr(m, "normalized_shape", None), tuple):
            m.normalized_shape = (new_size,)
    for m in new.modules():
        if is_linear_like(m):
            continue
        for attr in _SIZE_ATTRS:
            if getattr(m, attr, None) == d and not isinstance(getattr(m, attr), bool):
                setattr(m, attr, new_size)
    notes, config = [], {}
    cfg = getattr(new, "config", None)
    if cfg is not None and hasattr(cfg, "hidden_size"):
        heads = getattr(cfg, "num_attention_heads", None)
        if getattr(cfg, "head_dim", None) is not None:
            config["head_dim"] = cfg.head_dim
        elif heads:
            notes.append(f"this config derives the head size from hidden_size / num_attention_heads "
                         f"({new_size} / {heads}), which no longer holds: the modules keep head size {d // heads}, "
                         "but from_config would build another model")
        cfg.hidden_size = new_size
        config["hidden_size"] = new_size
    if new_size % d:
        notes.append(f"{new_size} is not a multiple of {d}: features are copied unequally often, so norms over the "
                     "stream change (see the output change)")
    changes = [f"residual stream {d} -> {new_size} features (each old feature copied {new_size // d}x"
               f"{'+' if new_size % d else ''}; split {split})",
               f"writers (rows copied): {len(writers)}; readers (columns shared): {len(readers)}; embeddings: "
               f"{len(done)}; norms: {len(norms)}" + (f"; tied output {tied_heads} via {final!r}" if final else "")]
    return _finish(what, model, new, probe, changes, config, notes)

