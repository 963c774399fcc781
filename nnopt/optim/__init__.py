"""Fused drop-in replacements for torch.optim: SGD, Adam, AdamW, Adagrad, RMSprop, NAdam, RAdam, Adamax, Adafactor,
Muon; Lion and LAMB."""

from nnopt.optim.adafactor import Adafactor
from nnopt.optim.adagrad import Adagrad
from nnopt.optim.adam import Adam, AdamW
from nnopt.optim.adamax import Adamax
from nnopt.optim.lamb import LAMB
from nnopt.optim.lion import Lion
from nnopt.optim.muon import Muon
from nnopt.optim.nadam import NAdam
from nnopt.optim.radam import RAdam
from nnopt.optim.rmsprop import RMSprop
from nnopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Adafactor", "Muon", "Lion",
           "LAMB"]
