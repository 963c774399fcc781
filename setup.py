"""Builds the extension nnopt._C; package metadata lives in pyproject.toml.

CPU sources (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are added when
the installed torch has CUDA and nvcc is found (CUDA_HOME), or when NNOPT_FORCE_CUDA=1.
NNOPT_CPU_ARCH overrides the CPU target (default: native, since the extension is built where it runs).
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _with_cuda():
    if os.environ.get("NNOPT_FORCE_CUDA") == "1":
        return True
    if os.environ.get("NNOPT_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    arch = os.environ.get("NNOPT_CPU_ARCH", "native")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    if arch:
        cxx.append(f"-march={arch}")
    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    kwargs = dict(
        name="nnopt._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if _with_cuda():
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "-fmad=false"]
        return cpp_extension.CUDAExtension(
            sources=sources + _sources("csrc/cuda/*.cu"),
            define_macros=[("NNOPT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
