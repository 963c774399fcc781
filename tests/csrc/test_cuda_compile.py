"""Compile-checks every csrc/cuda/*.cu with nvcc (no GPU needed): object files only, nothing is linked or run.

The nvcc flags are read from setup.py so the check builds what the extension builds. A CPU-only torch wheel ships
the c10/cuda headers but not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; the test writes that one-line
header into a temporary include directory (its content is fixed: C10_CUDA_BUILD_SHARED_LIBS, as in every torch
wheel) so the sources compile against the installed torch's headers.
"""

import ast
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_FILES = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu")) if os.path.isdir(CUDA_DIR) else []
ARCH = "sm_90"  # H100/H200, the GPU machine's cards
CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _setup_nvcc_flags():
    """The `nvcc = [...]` list of setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(r"^\s*nvcc\s*=\s*(\[[^\]]*\])", f.read(), re.MULTILINE)
    assert m, "setup.py no longer defines `nvcc = [...]`; update tests/csrc/test_cuda_compile.py"
    return ast.literal_eval(m.group(1))


def _include_dirs(tmp_path):
    from torch.utils import cpp_extension

    dirs = [os.path.join(ROOT, "csrc", "include"), *cpp_extension.include_paths()]
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in dirs):
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text(CMAKE_MACROS)
        dirs.append(str(tmp_path / "shim"))
    return dirs


@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc is not on PATH: the CUDA sources cannot be compile-checked"
)
@pytest.mark.skipif(not CU_FILES, reason="no csrc/cuda/*.cu sources")
@pytest.mark.parametrize("source", CU_FILES)
def test_cuda_source_compiles(source, tmp_path):
    import torch

    cmd = [
        "nvcc",
        "-c",
        os.path.join(ROOT, "csrc", "cuda", source),
        "-o",
        str(tmp_path / (source + ".o")),
        *_setup_nvcc_flags(),
        f"-arch={ARCH}",
        "-DNNOPT_WITH_CUDA",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcompiler",
        "-fPIC",
    ]
    for d in _include_dirs(tmp_path):
        cmd += ["-I", d]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    log = f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr[-8000:]}"
    assert res.returncode == 0, f"nvcc failed on csrc/cuda/{source}:\n{log}"
    assert (tmp_path / (source + ".o")).stat().st_size > 0
