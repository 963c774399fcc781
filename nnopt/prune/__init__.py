"""nnopt.prune: pruning whose masks cost nothing at run time (see nnopt/prune/_contract.py)."""

from nnopt.prune._contract import apply_mask, relink, remove_mask

__all__ = ["apply_mask", "relink", "remove_mask"]
