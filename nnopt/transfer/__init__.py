"""nnopt.transfer: moving what a model learned into another model.

- ``transfer_parameters`` copies weights between models that differ in names, shapes or layers, and returns a
  ``TransferReport`` saying what happened to every tensor (``parameters.py``, ``report.py``);
- ``clone_architecture``, ``widen``, ``deepen`` (Net2Net growth that keeps the function) and ``narrow``
  (shrinking by structured-pruning importance) change a model's architecture (``architecture.py``);
- ``widen_mlp``, ``narrow_mlp``, ``add_heads``, ``remove_heads``, ``insert_block``: growth (function-preserving)
  and shrinking of transformer blocks, found from the model's graph (``grow.py``, ``_graph.py``); ``widen_hidden``:
  a wider residual stream, bert2BERT-style (``hidden.py``);
- ``DistillationLoss`` (fused KL / reverse KL / JSD + cross-entropy on logits, its gradient computed in the
  forward pass), its functional form ``distillation_loss``, and ``distill``, a training loop
  (``distillation.py``).
"""

from nnopt.transfer.architecture import (
    DeepenReport,
    NarrowReport,
    WidenReport,
    clone_architecture,
    deepen,
    narrow,
    widen,
)
from nnopt.transfer.distillation import DistillationLoss, distill, distillation_loss
from nnopt.transfer.grow import (
    GraphError,
    GrowthReport,
    add_heads,
    insert_block,
    narrow_mlp,
    remove_heads,
    widen_mlp,
)
from nnopt.transfer.hidden import widen_hidden
from nnopt.transfer.parameters import transfer_parameters
from nnopt.transfer.report import TransferEntry, TransferReport

__all__ = [
    "DeepenReport", "NarrowReport", "TransferEntry", "TransferReport", "WidenReport",
    "clone_architecture", "deepen", "narrow", "transfer_parameters", "widen",
    "DistillationLoss", "distill", "distillation_loss",
    "GraphError", "GrowthReport", "add_heads", "insert_block", "narrow_mlp", "remove_heads", "widen_hidden",
    "widen_mlp",
]
