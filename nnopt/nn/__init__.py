"""Sparse-masked layers: MaskedLinear, convert/unconvert, and the functional form (nnopt.nn.functional)."""

from nnopt.nn import functional
from nnopt.nn.layout import BlockLayout
from nnopt.nn.masked_linear import MaskedLinear, convert, unconvert

__all__ = ["BlockLayout", "MaskedLinear", "convert", "functional", "unconvert"]
