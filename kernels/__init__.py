"""Triton kernels, one file per op family. Shipped as nnopt.kernels; never imports nnopt."""
