"""MaskedConv1D: transformers' ``Conv1D`` (GPT-2's transposed Linear, ``y = x W + b`` with W [in, out]) with a mask.

The twin of MaskedLinear for GPT-2-family models: a subclass of ``transformers.pytorch_utils.Conv1D`` with the same
parameters (``weight`` [nx, nf] = [in_features, out_features], ``bias`` [nf]) and state_dict keys, plus the bool
buffer ``weight_mask`` of the weight's shape ([in, out], as nnopt.prune stores a Conv1D's mask). The kernels see
the weight and mask as [out, in] (a transposed view of the weight; the mask transposed once per mask version), so
the tiles of ``block_size`` = (block_n, block_k) run over (output, input) features, as for MaskedLinear; the
decode path packs the panels from the transposed view once per weight version. Importing this module imports
transformers (``convert`` does it only when a model holds a Conv1D).
"""

import torch
from transformers.pytorch_utils import Conv1D

from nnopt.nn.masked_linear import MaskedLayerMixin, _hand_back, _take_over


class MaskedConv1D(MaskedLayerMixin, Conv1D):
    """``y = x (W ⊙ mask) + b`` for x [..., nx], W and mask [nx, nf]: a drop-in transformers Conv1D."""

    def __init__(self, nf, nx, *, mask=None, block_size=(32, 32), backend="auto"):
        super().__init__(nf, nx)
        self._init_masking(mask, block_size, backend)

    @property
    def in_features(self):
        return self.nx

    @property
    def out_features(self):
        return self.nf

    @classmethod
    def from_conv1d(cls, conv, mask=None, **kwargs):
        """A MaskedConv1D sharing ``conv``'s parameters, masked by ``mask`` ([nx, nf] bool; default: the mask
        ``conv.weight`` carries under nnopt.prune, which the new layer takes over, else all True)."""
        if not isinstance(conv, Conv1D):
            raise TypeError(f"from_conv1d: expected a transformers Conv1D, got {type(conv).__name__}")
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.nf, layer.nx = conv.nf, conv.nx
        layer._mask_t = None
        return _take_over(layer, conv, mask, kwargs)

    def to_conv1d(self):
        """A plain transformers Conv1D sharing this layer's parameters (zeros and, under nnopt.prune's contract, the
        mask kept)."""
        conv = Conv1D.__new__(Conv1D)
        torch.nn.Module.__init__(conv)
        conv.nf, conv.nx = self.nf, self.nx
        return _hand_back(self, conv)

    def to_plain(self):
        return self.to_conv1d()

    def _weight_nk(self):
        return self.weight.t()

    def _mask_nk(self):
        # One contiguous transpose per mask version (and tensor): the layout cache keys on this tensor.
        mask = self.weight_mask
        cached = getattr(self, "_mask_t", None)
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            cached = (mask, mask._version, mask.t().contiguous())
            self._mask_t = cached
        return cached[2]

    def set_mask(self, mask=None):
        self._mask_t = None
        return super().set_mask(mask)

    def __getstate__(self):
        return dict(super().__getstate__(), _mask_t=None)

    def __repr__(self):
        return (f"MaskedConv1D(nf={self.nf}, nx={self.nx}, sparsity={self.sparsity:.3f}, "
                f"block_size={self.block_size})")
