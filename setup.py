"""Builds sphinx_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and
nvcc is found. Sources and flags come from csrc/build.json (shared with CMakeLists.txt).

Environment:
  SPHINX_KERNELS_CUDA=0     build the CPU kernels only
  SPHINX_KERNELS_PORTABLE=1 plain C++ CPU loops only (-DSPHINX_KERNELS_PORTABLE): no AVX2/AVX-512 variants,
                            the build non-x86 hosts get; tests/seed_sweep.sh checks the suite against it
  TORCH_CUDA_ARCH_LIST      CUDA archs (default from build.json, "8.0;9.0a"); no GPU is ever queried here
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
CONFIG = json.loads((CSRC / "build.json").read_text())


def _cuda_include_dirs() -> list[str]:
    # pip's CUDA toolkit wheels (nvidia-*-cu13) keep headers such as cublas/cusparse beside torch;
    # the system toolkit may lack them, so add that folder when it exists.
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in spec.submodule_search_locations if spec else []:
        for sub in ("cu13", "cu12"):
            inc = Path(base) / sub / "include"
            if inc.is_dir():
                dirs.append(str(inc))
    return dirs


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpp = [f"csrc/{name}" for name in CONFIG["cpp_sources"]]
    cuda = [f"csrc/{name}" for name in CONFIG["cuda_sources"]]
    cxx_flags = list(CONFIG["cxx_flags"]) + ["-DSPHINX_KERNELS_PYTHON_MODULE"]
    if os.environ.get("SPHINX_KERNELS_PORTABLE", "0") != "0":
        cxx_flags.append("-DSPHINX_KERNELS_PORTABLE")
    want_cuda = os.environ.get("SPHINX_KERNELS_CUDA", "1") != "0"
    nvcc = CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    if want_cuda and torch.version.cuda and nvcc:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CONFIG["default_cuda_archs"])
        nvcc_flags = list(CONFIG["nvcc_flags"]) + ["-DSPHINX_KERNELS_PYTHON_MODULE"]
        return [
            CUDAExtension(
                "sphinx_kernels._C",
                cpp + cuda,
                include_dirs=[str(CSRC)] + _cuda_include_dirs(),
                define_macros=[("SPHINX_KERNELS_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=CONFIG["link_flags"],
            )
        ]
    return [
        CppExtension(
            "sphinx_kernels._C",
            cpp,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=CONFIG["link_flags"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
