"""Fused drop-in replacements for torch.optim: SGD, Adam, AdamW, Adagrad, RMSprop (any of them with 16/8/4-bit
states: ``state_bits=``), and the aliases Adam8bit, AdamW8bit, AdamW4bit."""

from nnopt.optim._quant_state import dequantized_state_dict
from nnopt.optim.adagrad import Adagrad
from nnopt.optim.adam import Adam, AdamW
from nnopt.optim.quantized import Adam8bit, AdamW4bit, AdamW8bit
from nnopt.optim.rmsprop import RMSprop
from nnopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adam8bit", "AdamW8bit", "AdamW4bit",
           "dequantized_state_dict"]
