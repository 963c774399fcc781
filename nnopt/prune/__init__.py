"""nnopt.prune: pruning whose masks cost nothing at run time (see nnopt/prune/_contract.py).

``import nnopt.prune as prune`` works where code used ``torch.nn.utils.prune``: the same functions, signatures
and masks, and torch's pruning method classes (``prune.L1Unstructured`` for ``global_unstructured``).
"""

from torch.nn.utils.prune import (
    BasePruningMethod,
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
)

from nnopt.prune._contract import apply_mask, relink, remove_mask
from nnopt.prune.checkpoint import from_torch, masks_from_zeros, restore
from nnopt.prune.global_ import global_unstructured
from nnopt.prune.importance import Taylor, weight_grad, weight_grad_scores
from nnopt.prune.methods import (
    custom_from_mask,
    identity,
    is_pruned,
    l1_unstructured,
    ln_structured,
    random_structured,
    random_unstructured,
    remove,
)
from nnopt.prune.report import Report, report
from nnopt.prune.structured import block_unstructured, nm_structured, zeros

__all__ = [
    "BasePruningMethod", "CustomFromMask", "Identity", "L1Unstructured", "LnStructured", "PruningContainer",
    "RandomStructured", "RandomUnstructured", "Report", "Taylor",
    "apply_mask", "block_unstructured", "custom_from_mask", "from_torch", "global_unstructured", "identity",
    "is_pruned", "l1_unstructured", "masks_from_zeros", "ln_structured", "nm_structured", "random_structured",
    "random_unstructured",
    "relink", "remove", "remove_mask", "report", "restore", "weight_grad", "weight_grad_scores", "zeros",
]

# Schedules, the training-loop driver, the iterative prune→retrain→evaluate loop and compaction.
from nnopt.prune import schedules
from nnopt.prune.compact import CompactReport, compact
from nnopt.prune.iterative import History, iterative
from nnopt.prune.pruner import Pruner

__all__ += ["CompactReport", "History", "Pruner", "compact", "iterative", "schedules"]

# One-shot pruning with calibration data (block by block, as the papers): Wanda and SparseGPT.
from nnopt.prune import oneshot
from nnopt.prune.sparsegpt import sparsegpt
from nnopt.prune.wanda import wanda

__all__ += ["oneshot", "sparsegpt", "wanda"]
