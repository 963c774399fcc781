"""nnopt: fused optimizers, pruning, sparse-masked layers and knowledge transfer for PyTorch.

Importing nnopt loads neither Triton nor the extension nnopt._C, and does not initialise CUDA.
"""

from nnopt.backends import BackendUnavailable, use_backend

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "use_backend", "__version__"]
