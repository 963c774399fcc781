"""`import nnopt` stays lean: no Triton, no nnopt._C, no CUDA initialisation."""

import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, torch, nnopt, nnopt.optim, nnopt.sparsity, nnopt.prune\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'nnopt._C' not in sys.modules, 'extension loaded'\n"
        "assert 'nnopt.kernels' not in sys.modules, 'kernels imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('lean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lean" in out.stdout


def test_import_without_triton_and_extension():
    """With triton and nnopt._C made unimportable, nnopt still imports and the torch backend still steps."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def block(name, *a, **k):\n"
        "    if name == 'triton' or name.startswith('triton.') or name == 'nnopt._C' or "
        "(name == 'nnopt' and a and a[2] and '_C' in a[2]):\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = block\n"
        "import torch, nnopt, nnopt.optim\n"
        "from nnopt import backends\n"
        "print(backends.missing('cpu', 'cpu'))\n"
        "print(backends.missing('triton', 'cpu'))\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "nnopt.optim.SGD([p], lr=0.5).step()\n"
        "assert torch.equal(p.detach(), torch.full((3,), 0.5))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("the C++ extension nnopt._C is not built")
    assert lines[-1] == "ok"
