"""Runnable examples: ``python -m nnopt.examples.<name>`` (``torchrun ... -m nnopt.examples.<name>`` for the
distributed ones)."""
