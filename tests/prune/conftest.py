"""Pruning tests run on one thread (see tests/conftest.py's one_thread)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield
