"""MaskedLinear (and MaskedConv1D, nnopt/nn/masked_conv1d.py): an nn.Linear whose weight carries a mask, computed
on block-sparse kernels where that pays.

The weight follows nnopt.prune's mask contract: it holds exact zeros at masked entries, the bool buffer
``weight_mask`` (True = kept) sits beside it and is the weight's mask in nnopt.sparsity, so nnopt optimizers keep
the zeros inside their kernels (torch.optim optimizers through the contract's post-step hook), and loading a
state_dict re-applies the mask. The layer's backward masks dW itself, so no gradient hook is added.

Inference on CPU (no gradient needed) of at most dispatch.PACKED_ROWS rows (decode, prefill, batch serving) takes
a short path: the layer keeps the panels of W ⊙ mask packed for the weight-streaming kernels (nnopt::masked_linear_packed)
and repacks them only when the weight, mask or bias changes (their versions) or the dtype does (autocast); a call
is then one op call. auto takes it per M class where the calibrated cost model predicts it beats dense F.linear.
The panels hold the kept tiles only (at 90% block sparsity, a tenth of the weight's memory).
"""

import torch

from nnopt import layers, sparsity
from nnopt.nn import dispatch, functional
from nnopt.nn.calibrate import m_class
from nnopt.prune import _contract


class MaskedLayerMixin:
    """What MaskedLinear and MaskedConv1D share: the mask, the forward on the kernels, the decode path. A subclass
    says how its weight and mask read as [out_features, in_features] (``_weight_nk``, ``_mask_nk``)."""

    _nnopt_masks_own_grad = True  # nnopt.prune's contract: backward already zeroes dW at masked entries
    _nnopt_links_in_forward = True  # the contract's mask link runs inside forward, not as a forward pre-hook

    def _init_masking(self, mask, block_size, backend):
        self.block_size = tuple(block_size)
        self.backend = backend
        self._plan = None
        self.set_mask(mask)

    def _weight_nk(self):
        return self.weight

    def _mask_nk(self):
        return self.weight_mask

    def _out_features(self):
        return self.out_features

    def _in_features(self):
        return self.in_features

    def set_mask(self, mask=None):
        """Sets the mask (bool, the weight's shape; None = all True) and zeroes the masked weights."""
        if mask is None:
            mask = torch.ones_like(self.weight, dtype=torch.bool)
        check_mask(self, mask)
        _contract.apply_mask(self, "weight", mask.contiguous())
        self._plan = None
        self._decode_plan = None
        self._mask_version = self.weight_mask._version
        return self

    @property
    def sparsity(self):
        """Fraction of masked (zero) weight entries."""
        return 1.0 - float(self.weight_mask.float().mean())

    def forward(self, x):
        if torch.compiler.is_compiling() and self._plan is not None:
            # Under torch.compile: the layout and implementation the last eager call chose (the registry and the
            # layout cache are host bookkeeping, not traceable); the products are registered ops with fakes.
            layout, impl = self._plan
            return functional.apply(x, self._weight_nk(), self._mask_nk(), self.bias, layout, impl)
        link = self.__dict__.get("_nnopt_mask_link")  # the contract's link (nnopt/prune/_contract.py)
        if link is not None:
            link(self, (x,))
        # The module's dicts read directly: nn.Module.__getattr__ costs ~1 us a lookup, a visible share of a
        # decode-shaped call (~200 us).
        params = self._parameters
        mask = self._buffers["weight_mask"]
        if mask._version != self._mask_version:
            # The mask was edited in place (weight_mask[i, j] = False): re-zero the weight so the contract holds
            # (the dense path relies on it); nnopt optimizers and the contract's hooks keep it from then on.
            with torch.no_grad():
                sparsity.zero_pruned_(self.weight, mask)
            self._mask_version = mask._version
        w, b = params.get("weight", None), params.get("bias", None)
        if w is None:  # a weight that is not a plain parameter (a parametrization): the attribute
            w, b = self.weight, self.bias
        if x.device.type == "cpu" and x.dim() and not (torch.is_grad_enabled() and (
                x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))):
            y = self._decode(x)
            if y is not None:
                return y
        mask_nk = self._mask_nk()
        xc, weight, bias = functional.autocast_operands(x, self._weight_nk(), self.bias)
        layout = dispatch.cached_layout(mask_nk, *self.block_size)
        m = xc.numel() // max(1, xc.shape[-1]) if xc.dim() else 0
        impl = dispatch.choose(layout, m, weight, self.backend, True,
                               grad_needed=functional.needs_grad(xc, weight, bias))
        # torch.compile replays this plan: the decode path's cache is host bookkeeping, so it replays the kernels
        self._plan = (layout, impl if impl is not dispatch.PACKED else dispatch.backends.implementation(
            dispatch.FAMILY, "cpu"))
        return functional.masked_linear(xc, weight, mask_nk, bias, self.backend, layout=layout,
                                        weight_is_masked=True, impl=impl)

    def _decode(self, x):
        """y for an inference call on the packed panels, or None when auto predicts dense F.linear to be faster
        for this many rows (or a forced non-CPU backend, a dtype mismatch: the checked path handles those)."""
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        if not 0 < m <= dispatch.PACKED_ROWS or self.backend not in ("auto", "cpu") or not x.is_floating_point():
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        params = self._parameters
        w, b = params.get("weight", None), params.get("bias", None)
        if w is None:
            w, b = self.weight, self.bias
        key = (self._buffers["weight_mask"]._version, w._version, w.data_ptr(), dtype, self.backend,
               None if b is None else (b._version, b.data_ptr()))
        plan = self._decode_plan
        if plan is None or plan[0] != key:
            plan = self._decode_plan = (key, {}, [None])  # key, M class -> packed pays, [runner]
        mc = m_class(m)
        pays = plan[1].get(mc)
        if pays is None:
            pays = plan[1][mc] = self._packed_pays(dtype, x, m)
        if not pays:
            return None
        if plan[2][0] is None:
            layout = dispatch.cached_layout(self._mask_nk(), *self.block_size)
            plan[2][0] = dispatch.packed_runner(self._weight_nk(), self._mask_nk(), self.bias, layout, dtype)
        if x.dim() == 2:  # [m, k]: the runner's own shape, no reshape or view
            return plan[2][0]((x if x.dtype == dtype else x.to(dtype)).contiguous())
        x2 = x.reshape(m, k)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        return plan[2][0](x2.contiguous()).view(*x.shape[:-1], self._out_features())

    def _packed_pays(self, dtype, x, m):
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled("cpu"):
            return False  # a dtype mismatch: the checked path raises the error
        if self.weight.dtype == torch.float64 and dtype != torch.float64 or x.shape[-1] != self._in_features():
            return False
        if self.weight.device.type != "cpu":
            return False
        if dispatch.backends.resolve(dispatch.FAMILY, self.backend, "cpu") != "cpu":
            return False
        if self.backend == "cpu":
            return True
        return dispatch.packed_pays(dispatch.cached_layout(self._mask_nk(), *self.block_size), dtype, m)

    def __getstate__(self):
        state = super().__getstate__()
        return dict(state, _plan=None, _decode_plan=None)  # host bookkeeping (closures): rebuilt by the next call

    def _apply(self, fn, *args, **kwargs):
        self._plan = None  # a new device or dtype: choose again
        self._decode_plan = None
        return super()._apply(fn, *args, **kwargs)


def check_mask(layer, mask):
    """The errors for a bad mask, naming the layer: a bool tensor of the weight's shape on the weight's device."""
    weight = layer.weight
    what = f"{type(layer).__name__} with weight {list(weight.shape)}"
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{type(layer).__name__}: mask must be a bool tensor, got {got} (layer {what})")
    if mask.shape != weight.shape:
        raise ValueError(f"{type(layer).__name__}: mask has shape {tuple(mask.shape)}, weight has shape "
                         f"{tuple(weight.shape)} (layer {what})")
    if mask.device != weight.device:
        raise ValueError(f"{type(layer).__name__}: mask is on {mask.device}, weight on {weight.device} "
                         f"(layer {what})")


class MaskedLinear(MaskedLayerMixin, torch.nn.Linear):
    """``y = x (W ⊙ mask)ᵀ + b`` for x [..., in_features]; a drop-in nn.Linear (same parameters and state_dict keys,
    plus the ``weight_mask`` buffer [out_features, in_features], bool).

    ``block_size`` (block_n, block_k) tiles the mask for the block-sparse kernels; ``backend`` as in
    nnopt.nn.functional.masked_linear (default "auto": dense where sparsity does not pay).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, mask=None,
                 block_size=(32, 32), backend="auto"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_masking(mask, block_size, backend)

    @classmethod
    def from_linear(cls, linear, mask=None, **kwargs):
        """A MaskedLinear sharing ``linear``'s parameters (the same tensors) and masked by ``mask`` (default: the
        mask ``linear.weight`` already carries under nnopt.prune, which the new layer takes over, else all True)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        return _take_over(layer, linear, mask, kwargs)

    def to_linear(self):
        """A plain nn.Linear sharing this layer's parameters; its weight keeps the zeros and, under nnopt.prune's
        contract, the mask (so pruning stays in force there)."""
        linear = torch.nn.Linear.__new__(torch.nn.Linear)
        torch.nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        return _hand_back(self, linear)

    def to_plain(self):
        """The layer convert replaced: ``to_linear()``."""
        return self.to_linear()

    def extra_repr(self):
        return f"{super().extra_repr()}, sparsity={self.sparsity:.3f}, block_size={self.block_size}"


def _take_over(layer, source, mask, kwargs):
    """Gives ``layer`` (a fresh MaskedLinear/MaskedConv1D) the parameters of ``source`` and its mask."""
    block_size = tuple(kwargs.pop("block_size", (32, 32)))
    backend = kwargs.pop("backend", "auto")
    if kwargs:
        raise TypeError(f"from_linear: unexpected arguments {sorted(kwargs)}")
    layer.weight = source.weight
    layer.bias = source.bias
    carried = source._buffers.get("weight_mask") if "weight" in _contract.pruned_names(source) else None
    chosen = carried if mask is None else mask
    if chosen is not None:
        check_mask(layer, chosen)  # before anything changes: a bad mask leaves source as it was
    if carried is not None:
        # The new layer takes over the pruning: its backward masks dW itself, so the source's gradient hook
        # (which would keep masking with the old mask, even after set_mask regrows entries) goes.
        _contract.remove_mask(source, "weight")
    layer._init_masking(chosen, block_size, backend)
    layer.train(source.training)
    return layer


def _hand_back(layer, plain):
    plain.weight, plain.bias = layer.weight, layer.bias
    plain.train(layer.training)
    if not bool(layer.weight_mask.all()):
        _contract.apply_mask(plain, "weight", layer.weight_mask)
    return plain


def _matches(name, include, exclude):
    import fnmatch

    if include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(name, pat) for pat in exclude))


def _convertible(module, types):
    """Whether ``module`` is one of the layers convert replaces: its exact type in ``types`` (default: nn.Linear
    and transformers' Conv1D; subclasses such as MultiheadAttention's projection are left alone)."""
    if isinstance(module, MaskedLayerMixin):
        return False
    if types is None:
        return type(module) is torch.nn.Linear or (layers.is_conv1d(module) and type(module).__name__ == "Conv1D")
    return type(module) in types


def _masked_twin(module, **kwargs):
    if layers.is_conv1d(module):
        from nnopt.nn.masked_conv1d import MaskedConv1D

        return MaskedConv1D.from_conv1d(module, **kwargs)
    return MaskedLinear.from_linear(module, **kwargs)


def convert(model, include=None, exclude=None, types=None, **kwargs):
    """Replaces, in place, each linear layer of ``model`` — ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), or
    the exact types in ``types`` — whose qualified name passes the glob patterns ``include``/``exclude``, by a
    MaskedLinear (MaskedConv1D for Conv1D) sharing its parameters and mask. Returns ``model`` (``model`` itself
    converted when it is such a layer). ``kwargs``: block_size, backend.

    Raises ValueError when nothing in ``model`` matches, and, naming the layer, when a layer's mask is unusable
    (not bool, another shape or device); every layer is checked before any is replaced, so on error the model is
    untouched."""
    if isinstance(model, MaskedLayerMixin):
        return model
    unknown = set(kwargs) - {"block_size", "backend"}
    if unknown:
        raise TypeError(f"convert: unexpected arguments {sorted(unknown)} (block_size, backend)")
    if "backend" in kwargs:
        dispatch.backends.requested(kwargs["backend"])  # raises for an unknown name
    if _convertible(model, types):
        _check_carried_mask("<model>", model)
        return _masked_twin(model, **kwargs)
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if _convertible(child, types) and _matches(full, include, exclude):
                targets.append((module, child_name, full, child))
    if not targets:
        raise ValueError(f"convert: {type(model).__name__} has no nn.Linear or transformers Conv1D layer"
                         + (" matching include/exclude" if include is not None or exclude is not None else "")
                         + " to convert")
    for _, _, full, child in targets:
        _check_carried_mask(full, child)
    for module, child_name, _, child in targets:
        setattr(module, child_name, _masked_twin(child, **kwargs))
    return model


def _check_carried_mask(name, layer):
    carried = layer._buffers.get("weight_mask") if "weight" in _contract.pruned_names(layer) else None
    if carried is None:
        return
    try:
        check_mask(layer, carried)
    except (TypeError, ValueError) as e:
        raise type(e)(f"convert: layer {name!r}: {e}") from e


def unconvert(model):
    """Replaces, in place, each MaskedLinear (MaskedConv1D) of ``model`` by an nn.Linear (transformers Conv1D)
    sharing its parameters (and mask): the original classes and state_dict keys."""
    if isinstance(model, MaskedLayerMixin):
        return model.to_plain()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MaskedLayerMixin):
                setattr(module, child_name, child.to_plain())
    return model
