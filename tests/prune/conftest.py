"""Pruning tests run on one thread: their tiny models gain nothing from threads, and spinning OpenMP threads on
a busy 2-core machine cost up to 100x."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
