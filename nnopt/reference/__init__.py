"""Plain-PyTorch references: the test oracle, the benchmark baseline and the `torch` backend."""
