"""Seeds, Triton's interpreter on CPU-only machines, and the backend × device parametrization with skips.

A test that takes the ``backend`` fixture runs once per backend; the registry's sentence is the skip reason.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nnopt import backends  # noqa: E402

DEVICES = ["cpu", "cuda"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device, and torch sees none")
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module on one intra-op thread: tiny tensors gain nothing from threads, and spinning OpenMP threads on
    a busy 2-core machine costs up to 100x. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def skip_unless_available(backend, device, family="fused_optim"):
    why = backends.missing(backend, device, family)
    if why is not None:
        pytest.skip(why)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device, and torch sees none"))
