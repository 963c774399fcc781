"""Fused drop-in replacements for torch.optim: SGD, Adam, AdamW, Adagrad, RMSprop."""

from nnopt.optim.adagrad import Adagrad
from nnopt.optim.adam import Adam, AdamW
from nnopt.optim.rmsprop import RMSprop
from nnopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"]
