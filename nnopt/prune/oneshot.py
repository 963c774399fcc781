"""The one-shot driver Wanda and SparseGPT share: calibration, block-by-block, layer by layer, as the papers do.

    inputs  <- the first transformer block's inputs, one entry per calibration batch (a pre-hook stops the model there)
    for each block:
        for each group of selected layers that read the same input tensor (q/k/v; gate/up), in execution order:
            run the block on every input, a pre-hook on the group's layer accumulates its statistics and stops
            the block there (nothing after it runs); prune every layer of the group from those statistics
        inputs <- the block's outputs, recomputed with the pruned weights (in place of its inputs)

Each group sees the outputs of the layers pruned before it ("true sequential"), so later layers compensate for
earlier ones. Memory: the block inputs of every calibration batch (one block's activations, overwritten by its
outputs), the forward's own temporaries, one group's statistics (a K-vector for Wanda, one K×K float32 Hessian for
SparseGPT) and the pruning method's working copy of one layer; no whole-model activation cache, nothing offloaded.

Layers: every linear layer (``nnopt.layers``: ``nn.Linear`` and transformers' ``Conv1D``) inside the transformer
blocks (the ``nn.ModuleList`` holding the most of them, or ``blocks=`` naming one; a model without one is a single
block), minus ``skip`` (default: ``lm_head``) and any layer whose weight is an embedding's (tied). ``layers=``
narrows the choice: glob patterns on the qualified names (``"*.mlp.*"``), a list of them, or a callable
``(name, module) -> bool``. Embeddings are never pruned here.

OWL (``owl=(M, lambda)``, Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): instead of one sparsity for
every block, blocks whose Wanda scores hold more outliers (scores above M times their layer's mean) are pruned
less, linearly within [S - lambda, S + lambda] and S on average (the paper uses M = 5, lambda = 0.08); it costs one
dense pass over the blocks before pruning.

Patterns (``pattern=``): ``"unstructured"`` (default; each method's own comparison group), ``"N:M"`` (keep ``N`` of
every ``M`` consecutive weights along the input dimension, in every output row; ``sparsity`` is then 1 - N/M and
may be omitted) or a ``(bn, bk)`` tuple (whole ``bn`` outputs × ``bk`` inputs blocks, scored per block). A
pattern must divide every selected layer. ``sparsity``: a float in [0, 1), or a dict of glob pattern -> float
(the first matching key wins; layers matching none stay dense).

The result follows nnopt's mask contract: zeros in the weights and a ``weight_mask`` buffer per pruned layer (kept
by training with nnopt or torch optimizers). Arguments are checked before anything is written; a failure while
pruning (a Hessian that damping cannot make positive definite, an interrupt) restores every weight and mask
written so far when ``atomic=True`` (the default; it keeps a copy of each original weight until the end: pass
``atomic=False`` to save that memory).
"""

import dataclasses
import fnmatch
import functools
import numbers
import warnings

import torch

from nnopt.layers import in_out_features, is_conv1d, is_linear_like, weight_as_linear
from nnopt.prune._contract import MASK_SUFFIX, apply_mask, remove_mask

__all__ = ["Pattern", "Stats", "parse_pattern", "run", "split_hessian_available"]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A parsed ``pattern=``: kind "unstructured", "nm" (keep n of every m along the inputs) or "block"."""

    kind: str
    n: int = 0
    m: int = 0
    block: tuple = ()

    @property
    def sparsity(self):
        """The sparsity an N:M pattern implies (None for the others)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def check_layer(self, name, out_features, in_features):
        """ValueError naming the layer when the pattern does not divide its ``[out, in]`` weight."""
        if self.kind == "nm" and in_features % self.m:
            raise ValueError(f"pattern {self.n}:{self.m} needs M={self.m} to divide the {in_features} input "
                             f"features of layer {name!r}")
        if self.kind == "block":
            bn, bk = self.block
            if out_features % bn or in_features % bk:
                raise ValueError(f"pattern {self.block} needs blocks that divide layer {name!r}'s "
                                 f"[out, in] = [{out_features}, {in_features}] weight")

    def __str__(self):
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}", "block": f"{self.block}"}[self.kind]


def _int(value, arg):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int, got {value!r}")
    return int(value)


def parse_pattern(pattern):
    """``pattern=`` as a Pattern: None/"unstructured", "N:M" (1 <= N <= M) or a (bn, bk) pair of positive ints."""
    if pattern is None or pattern == "unstructured":
        return Pattern("unstructured")
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"pattern={pattern!r}: expected 'unstructured', 'N:M' (e.g. '2:4') or a (bn, bk) tuple")
        n, m = int(parts[0]), int(parts[1])
        if m < 1 or n < 1:
            raise ValueError(f"pattern={pattern!r}: N and M must be >= 1")
        if n > m:
            raise ValueError(f"pattern={pattern!r}: N={n} must be <= M={m} (N is the number kept of every M)")
        return Pattern("nm", n, m)
    if isinstance(pattern, (tuple, list)) and len(pattern) == 2:
        bn, bk = (_int(v, f"pattern[{i}]") for i, v in enumerate(pattern))
        if bn < 1 or bk < 1:
            raise ValueError(f"pattern={tuple(pattern)}: block sizes must be >= 1")
        return Pattern("block", block=(bn, bk))
    raise TypeError(f"pattern must be 'unstructured', 'N:M' or a (bn, bk) tuple, got {pattern!r}")


def _check_fraction(value, arg):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a float in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{arg}={value} must be in [0, 1)")
    return value


def _sparsities(sparsity, pattern, names):
    """{layer name: sparsity} for the layers to prune (dict keys are globs; unmatched layers are left out)."""
    if pattern.kind == "nm":
        if isinstance(sparsity, dict):
            raise ValueError(f"sparsity: an N:M pattern ({pattern}) fixes the sparsity; pass sparsity=None")
        if sparsity is not None and abs(_check_fraction(sparsity, "sparsity") - pattern.sparsity) > 1e-9:
            raise ValueError(f"sparsity={sparsity} contradicts pattern {pattern} (sparsity {pattern.sparsity:g}); "
                             "pass sparsity=None")
        return {n: pattern.sparsity for n in names}
    if sparsity is None:
        raise TypeError(f"sparsity is required for pattern {pattern}")
    if isinstance(sparsity, dict):
        rules = [(str(k), _check_fraction(v, f"sparsity[{k!r}]")) for k, v in sparsity.items()]
        out = {}
        for n in names:
            for key, value in rules:
                if fnmatch.fnmatchcase(n, key):
                    out[n] = value
                    break
        if not out:
            raise ValueError(f"sparsity: no key of {list(sparsity)} matches a selected layer (e.g. {names[:3]})")
        return out
    value = _check_fraction(sparsity, "sparsity")
    return {n: value for n in names}


def _find_blocks(model, blocks, linear_names):
    """(qualified name of the block list or "", [(block name, block module)])."""
    if blocks is not None:
        if not isinstance(blocks, str):
            raise TypeError(f"blocks must be the qualified name of an nn.ModuleList, got {blocks!r}")
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks={blocks!r}: {type(model).__name__} has no such submodule") from None
        if not isinstance(found, torch.nn.ModuleList) or len(found) == 0:
            raise ValueError(f"blocks={blocks!r} is a {type(found).__name__}, not a non-empty nn.ModuleList")
        lists = [(blocks, found)]
    else:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]

    def held(prefix):
        return sum(1 for n in linear_names if n.startswith(prefix + "."))

    best = max(lists, key=lambda nm: held(nm[0]), default=None)
    if best is None or held(best[0]) == 0:
        return "", [("", model)]
    dot = best[0] + "."
    return best[0], [(dot + str(i), b) for i, b in enumerate(best[1])]


def _tied_to_embedding(model):
    ids = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            ids.add(id(m.weight))
    return ids


def select(model, layers=None, skip=("lm_head", "*.lm_head"), blocks=None):
    """(blocks, {block name: [(layer name, module)]}) of the layers one-shot pruning takes (see the module doc)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip or ())
    tied = _tied_to_embedding(model)
    candidates = [(n, m) for n, m in model.named_modules()
                  if is_linear_like(m) and isinstance(m._parameters.get("weight"), torch.Tensor)]
    if layers is None:
        chosen = candidates
    elif callable(layers):
        chosen = [(n, m) for n, m in candidates if layers(n, m)]
    else:
        globs = (layers,) if isinstance(layers, str) else tuple(layers)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise TypeError(f"layers must be a glob, a list of globs or a callable (name, module), got {layers!r}")
        chosen = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    chosen = [(n, m) for n, m in chosen
              if not any(fnmatch.fnmatchcase(n, s) for s in skip) and id(m.weight) not in tied]
    if not chosen:
        found = [n for n, _ in candidates][:6]
        raise ValueError(f"no layer of {type(model).__name__} matches layers={layers!r} (skip={skip}); linear "
                         f"layers found: {found}{' ...' if len(candidates) > 6 else ''}")
    list_name, block_list = _find_blocks(model, blocks, [n for n, _ in chosen])
    by_block, outside = {b: [] for b, _ in block_list}, []
    for n, m in chosen:
        home = next((b for b, _ in block_list if b == "" or n.startswith(b + ".")), None)
        (by_block[home] if home is not None else outside).append((n, m))
    if outside:
        if layers is None:  # the default selection: layers inside the blocks only
            pass
        else:
            raise ValueError(f"layers {[n for n, _ in outside][:4]} are outside the transformer blocks "
                             f"({list_name}); one-shot pruning prunes layers inside the blocks (blocks=...)")
    if not any(by_block.values()):
        raise ValueError(f"no selected layer of {type(model).__name__} is inside the blocks {list_name!r}")
    return block_list, by_block


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward does not run."""


def split_hessian_available():
    """True when this process computes bf16 products on AMX tiles with float32 accumulation (nnopt._C built, a CPU
    with AMX-BF16, and the OS granting the tile state): where the split Hessian beats float32 (cached per process)."""
    return _amx_usable()


@functools.lru_cache(maxsize=None)
def _amx_usable():
    from nnopt import _ext

    return _ext.load() is None and bool(torch.ops.nnopt.amx_bf16_usable())


class Stats:
    """Per-group calibration statistics of the inputs ``x`` (``[..., K]``) of a layer.

    "norms": ``sum_t x_tj^2`` per input feature j (float32 K-vector; Wanda's ``||X_j||_2`` is its sqrt);
    "hessian": ``sum_t x_t x_t^T`` (float32 K×K; its upper triangle is computed and mirrored once: XᵀX is
    symmetric).

    ``dtype``, how the Hessian's products run:
    - None (default): "split" on CPUs where ``split_hessian_available()``, else float32;
    - "split": x = hi + lo, hi = bf16(x), lo = bf16(x - hi) (~16 mantissa bits), H += hiᵀhi + hiᵀlo + loᵀhi +
      diag(loᵀlo) on AMX tiles with float32 accumulation (csrc/cpu/oneshot.cpp, hessian_accumulate_); every bf16
      product is exact in float32, the dropped off-diagonal loᵀlo is ~2^-16 relative and zero-mean: float32-class
      accuracy (bench/RESULTS.md, issue 14) at ~3 bf16 triangles' cost, ~2.5x faster than float32 here;
    - torch.float32: exact float32 products (the opt-out);
    - torch.bfloat16: x rounded to bf16 once (hiᵀhi): on AMX with float32 accumulation over each batch (~5x
      float32), elsewhere oneDNN's bf16 GEMMs whose per-batch product is rounded to bf16 before the float32 add.
    """

    TILES = 4
    DTYPES = (None, "split", torch.float32, torch.bfloat16)

    @classmethod
    def check_dtype(cls, dtype):
        """ValueError unless ``dtype`` is one of ``DTYPES``."""
        if not any(dtype is d or (isinstance(d, str) and isinstance(dtype, str) and dtype == d) for d in cls.DTYPES):
            raise ValueError(f"hessian_dtype must be None, 'split', torch.float32 or torch.bfloat16, got {dtype!r}")

    def __init__(self, kind, in_features, device, dtype=torch.float32):
        self.check_dtype(dtype)
        device = torch.device(device)
        if dtype is None:
            dtype = "split" if device.type == "cpu" and split_hessian_available() else torch.float32
        if dtype == "split" and device.type != "cpu":
            raise ValueError(f"hessian_dtype='split' runs on CPU only (AMX tiles); got a {device.type} layer")
        self.kind, self.k, self.count, self.dtype = kind, in_features, 0, dtype
        self.kernel = kind == "hessian" and device.type == "cpu" and (
            dtype == "split" or (dtype == torch.bfloat16 and split_hessian_available()))
        shape = (in_features,) if kind == "norms" else (in_features, in_features)
        self.value = torch.zeros(shape, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, x):
        x = x.detach().reshape(-1, self.k)
        self.count += x.shape[0]
        if self.kind == "norms":
            # In chunks of ~2 MiB: the squares stay in L2 (4-5x a whole-batch square().sum(0) at 2048×4096);
            # much smaller chunks (32 rows) make sum(0) split badly across two threads (60x slower here).
            for chunk in x.split(max(1, (1 << 19) // self.k)):
                self.value.add_(chunk.float().square().sum(0))
            return
        k, h = self.k, self.value
        if self.kernel:  # the upper triangle (i <= j) on AMX tiles, float32 accumulation over the batch
            torch.ops.nnopt.hessian_accumulate_(h, x.float(), 3 if self.dtype == "split" else 1)
            return
        t = self.TILES if k >= 512 else 1
        edges = [k * i // t for i in range(t + 1)]
        if self.dtype == torch.bfloat16:
            # oneDNN's bf16 GEMM has no float32 output on CPU: each tile's product comes back in bf16 and is added
            # in float32. A contiguous xᵀ is faster than the transposed view here.
            x = x.to(torch.bfloat16)
            xt = x.t().contiguous()
            for a in range(t):
                for b in range(a, t):
                    h[edges[a]:edges[a + 1], edges[b]:edges[b + 1]].add_(
                        torch.mm(xt[edges[a]:edges[a + 1]], x[:, edges[b]:edges[b + 1]]))
            return
        x = x.float()
        for a in range(t):
            xa = x[:, edges[a]:edges[a + 1]]
            for b in range(a, t):
                h[edges[a]:edges[a + 1], edges[b]:edges[b + 1]].addmm_(xa.t(), x[:, edges[b]:edges[b + 1]])

    def finish(self):
        """The statistics (the Hessian's upper triangle mirrored to full); the accumulator is handed over."""
        if self.kind == "hessian":
            k, h = self.k, self.value
            t = max(1, -(-k // 512))  # mirror in 512-wide tiles: no K×K temporary
            edges = [k * i // t for i in range(t + 1)]
            for a in range(t):
                d = h[edges[a]:edges[a + 1], edges[a]:edges[a + 1]]
                d.copy_(d.triu() + d.triu(1).t())
                for b in range(a + 1, t):
                    h[edges[b]:edges[b + 1], edges[a]:edges[a + 1]] = h[edges[a]:edges[a + 1],
                                                                        edges[b]:edges[b + 1]].t()
        value, self.value = self.value, None
        return value


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _call(model, batch, i, device):
    batch = _to(batch, device)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"calibration[{i}] must be a tensor, a dict of tensors or a tuple of them, "
                    f"got {type(batch).__name__}")


def _capture(model, first, calibration, device, first_name):
    """[[args, kwargs]] of ``first`` (the first block) for every calibration batch; nothing after it runs."""
    inputs = []

    def hook(module, args, kwargs):
        inputs.append([tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                       {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}])
        raise _Stop

    try:
        iterator = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of model inputs, got {type(calibration).__name__}") from None
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(iterator):
            try:
                _call(model, batch, i, device)
            except _Stop:
                continue
            except TypeError as e:
                if str(e).startswith(f"calibration[{i}]"):
                    raise
                raise ValueError(f"calibration[{i}]: {type(model).__name__} rejected it ({type(e).__name__}: "
                                 f"{e})") from e
            except Exception as e:
                raise ValueError(f"calibration[{i}]: {type(model).__name__} rejected it ({type(e).__name__}: "
                                 f"{e})") from e
            raise ValueError(f"calibration[{i}]: the forward never reached block {first_name or '(model)'}")
    finally:
        handle.remove()
    if not inputs:
        raise ValueError("calibration is empty: one-shot pruning needs at least one batch of model inputs")
    return inputs


def _run_block(block, entry):
    args, kwargs = entry
    return block(*args, **kwargs)


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_hidden(entry, hidden):
    args, kwargs = entry
    if args:
        entry[0] = (hidden,) + tuple(args[1:])
    else:
        entry[1] = dict(kwargs, hidden_states=hidden)


def _groups(block, layers, entry):
    """Layers of ``block`` grouped by the input tensor they read, in execution order; and those never called.

    Inputs are told apart by identity, with every one held alive until the forward ends (a freed tensor's memory
    can come back with the same address and shape for the next layer's input). The forward stops once every
    layer has been seen (a block that is one Linear never runs its product)."""
    seen, handles = [], []
    wanted = {name for name, _ in layers}

    def make(name, module):
        def hook(mod, args):
            seen.append((name, module, args[0]))
            wanted.discard(name)
            if not wanted:
                raise _Stop
        return hook

    for name, module in layers:
        handles.append(module.register_forward_pre_hook(make(name, module)))
    try:
        _run_block(block, entry)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    groups, inputs, done = [], [], set()
    for name, module, x in seen:
        if name in done:
            continue
        done.add(name)
        index = next((i for i, y in enumerate(inputs) if y is x), None)
        if index is not None:
            groups[index].append((name, module))
        else:
            inputs.append(x)
            groups.append([(name, module)])
    missing = [n for n, _ in layers if n not in done]
    return groups, missing


def _collect(block, entries, module, kind, dtype=torch.float32):
    """Statistics of ``module``'s input over every calibration entry, stopping the block after its first call."""
    k = in_out_features(module)[0]
    stats = Stats(kind, k, module.weight.device, dtype)

    def hook(mod, args):
        stats.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for entry in entries:
            try:
                _run_block(block, entry)
            except _Stop:
                pass
    finally:
        handle.remove()
    return stats


class _Undo:
    """Original weights and masks of the layers written so far (``atomic=True``), to put back on failure."""

    def __init__(self, atomic):
        self.atomic, self.saved = atomic, []

    def save(self, module):
        if not self.atomic:
            return
        mask = module._buffers.get("weight" + MASK_SUFFIX)
        self.saved.append((module, module.weight.detach().clone(), None if mask is None else mask.clone()))

    @torch.no_grad()
    def restore(self):
        for module, weight, mask in reversed(self.saved):
            if mask is None:
                if "weight" + MASK_SUFFIX in module._buffers:
                    remove_mask(module, "weight")
                module.weight.copy_(weight)
            else:
                module.weight.copy_(weight)
                apply_mask(module, "weight", mask)


def check_owl(owl, sparsity, pattern):
    """``owl``: None or (M, lambda) with M > 0 and 0 <= lambda; only with a float sparsity, not with N:M."""
    if owl is None:
        return None
    if not isinstance(owl, (tuple, list)) or len(owl) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in owl):
        raise TypeError(f"owl must be None or an (M, lambda) pair of numbers, e.g. (5, 0.08); got {owl!r}")
    m, lam = float(owl[0]), float(owl[1])
    if m <= 0 or lam < 0:
        raise ValueError(f"owl=(M={m}, lambda={lam}): need M > 0 and lambda >= 0")
    if pattern.kind == "nm" or isinstance(sparsity, dict) or sparsity is None:
        raise ValueError("owl: layer-wise ratios need one float sparsity and an unstructured or block pattern")
    s = _check_fraction(sparsity, "sparsity")
    if s - lam < 0 or s + lam >= 1:
        raise ValueError(f"owl: sparsity {s} ± lambda {lam} must stay inside [0, 1)")
    return m, lam


def _wanda_scores(block, layers, entries):
    """The Wanda scores ``|W_ij| · ||X_j||`` (float32 ``[out, in]``) of ``block``'s layers on ``entries``."""
    groups, _ = _groups(block, layers, entries[0])
    scores = []
    for group in groups:
        norms = _collect(block, entries, group[0][1], "norms").finish().sqrt()
        for _, module in group:
            scores.append(weight_as_linear(module).detach().abs().float() * norms.unsqueeze(0))
    return scores


def _owl_targets(block_list, by_block, entries, sparsity, owl, targets):
    """Per-layer sparsity from OWL (Yin et al., 2024): blocks with more outlier scores keep more weights.

    A dense pass (no weight changes) over shallow copies of the block inputs gives each block's outlier ratio
    D_l; the ratios are mapped linearly onto [S - lambda, S + lambda] (reversed: more outliers, less sparsity)
    with mean S, as the paper's code does."""
    m_factor, lam = owl
    copies = [[e[0], e[1]] for e in entries]
    ratios = {}
    for index, (name, block) in enumerate(block_list):
        if by_block.get(name):
            above = total = 0
            for score in _wanda_scores(block, by_block[name], copies):
                above += int((score > m_factor * score.mean()).sum())
                total += score.numel()
            ratios[name] = above / total
        if index + 1 < len(block_list):
            for entry in copies:
                _replace_hidden(entry, _hidden(_run_block(block, entry)))
    values = torch.tensor(list(ratios.values()), dtype=torch.float64)
    if len(values) > 1 and float(values.max() - values.min()) > 0:
        density = (values - values.min()) / (values.max() - values.min()) * (2 * lam)
        density = density - density.mean() + (1 - sparsity)
    else:
        density = torch.full_like(values, 1 - sparsity)
    per_block = dict(zip(ratios, (1 - density).tolist()))
    out = {}
    for name, layers in by_block.items():
        for n, _ in layers:
            if n in targets:
                out[n] = min(max(per_block[name], 0.0), 1.0 - 1e-9)
    return out


@torch.no_grad()
def run(model, calibration, method, sparsity, pattern=None, layers=None, skip=("lm_head", "*.lm_head"),
        blocks=None, atomic=True, label="oneshot", owl=None):
    """Prunes ``model`` in place with ``method``; returns {layer name: its sparsity afterwards}.

    ``method``: an object with ``stats`` ("norms" or "hessian"), ``check(name, module)`` (argument checks per
    layer, before anything is written) and ``prune(weight [out, in] float32, stats, sparsity, pattern, old mask or
    None, name) -> (new weight or None, keep mask [out, in] bool)``, or ``prune_group`` for a whole group.
    """
    pattern = parse_pattern(pattern)
    owl = check_owl(owl, sparsity, pattern)
    block_list, by_block = select(model, layers, skip, blocks)
    names = [n for b in by_block.values() for n, _ in b]
    targets = _sparsities(sparsity, pattern, names)
    for block_name, layer_list in by_block.items():
        by_block[block_name] = [(n, m) for n, m in layer_list if n in targets]
    for n, m in (item for b in by_block.values() for item in b):
        pattern.check_layer(n, in_out_features(m)[1], in_out_features(m)[0])
        method.check(n, m)
    device = next(m for b in by_block.values() for _, m in b).weight.device

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    undo = _Undo(atomic)
    result = {}
    try:
        if use_cache is not None:
            config.use_cache = False
        model.eval()
        first_name, first = block_list[0]
        entries = _capture(model, first, calibration, device, first_name)
        if owl is not None:
            targets = _owl_targets(block_list, by_block, entries, float(sparsity), owl, targets)
        for index, (block_name, block) in enumerate(block_list):
            todo = by_block.get(block_name, [])
            if todo:
                groups, missing = _groups(block, todo, entries[0])
                if missing:
                    warnings.warn(f"{label}: layers {missing} never ran in block {block_name!r} on the "
                                  "calibration data; left unpruned", stacklevel=3)
                for group in groups:
                    stats = _collect(block, entries, group[0][1], method.stats,
                                     getattr(method, "stats_dtype", torch.float32))
                    value = stats.finish()
                    for name, module in group:
                        undo.save(module)
                        _prune_layer(method, name, module, value, targets[name], pattern)
                        keep = module._buffers["weight" + MASK_SUFFIX]
                        result[name] = 1.0 - float(keep.sum()) / keep.numel()
                    del value
                    if hasattr(method, "release"):
                        method.release()
            if index + 1 < len(block_list):  # the next block's inputs (the last block's outputs are not needed)
                for entry in entries:
                    _replace_hidden(entry, _hidden(_run_block(block, entry)))
    except BaseException:
        undo.restore()
        raise
    finally:
        model.train(was_training)
        if use_cache is not None:
            config.use_cache = use_cache
    return result


def _prune_layer(method, name, module, stats, sparsity, pattern):
    w = weight_as_linear(module)  # [out, in]; a transposed view for Conv1D, so writes land in the parameter
    old = module._buffers.get("weight" + MASK_SUFFIX)
    if old is not None and is_conv1d(module):
        old = old.t()
    new, keep = method.prune(w.detach(), stats, sparsity, pattern, old, name)
    if new is not None:
        w.copy_(new.to(w.dtype))
    apply_mask(module, "weight", keep.t().contiguous() if is_conv1d(module) else keep, copy=False)
