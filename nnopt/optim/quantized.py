"""Drop-in names for users of bitsandbytes and torchao: Adam/AdamW with 8-bit or 4-bit block-quantized states.

Thin aliases for ``state_bits=``: the constructor arguments are torch.optim's (plus nnopt's ``block_size``,
``min_quant_size``, ``backend``, ``master_weights``, ``l1``, ``stochastic_rounding``).
"""

from nnopt.optim.adam import Adam, AdamW


def _fixed_bits(cls, bits):
    def __init__(self, params, *args, **kwargs):
        if "state_bits" in kwargs:
            raise TypeError(f"{type(self).__name__} has state_bits={bits}; use {cls.__name__}(state_bits=...) "
                            "for another width")
        cls.__init__(self, params, *args, state_bits=bits, **kwargs)

    return __init__


class Adam8bit(Adam):
    """``Adam(..., state_bits=8)``: uint8 block-wise dynamic states (2.03 bytes/param for Adam's two states)."""

    __init__ = _fixed_bits(Adam, 8)


class AdamW8bit(AdamW):
    """``AdamW(..., state_bits=8)``."""

    __init__ = _fixed_bits(AdamW, 8)


class AdamW4bit(AdamW):
    """``AdamW(..., state_bits=4)``: two codes per byte, bf16 scales per 128-element block (1.03 bytes/param)."""

    __init__ = _fixed_bits(AdamW, 4)
