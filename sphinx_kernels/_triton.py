"""Triton, or stand-ins that let kernel modules import (and define their kernels) without it.

Kernel modules do ``from sphinx_kernels._triton import triton, tl``; without Triton the decorators return
the plain function and `_backend` never selects the triton backend, so the kernels are never launched.
"""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # Triton is optional: CPU-only installs run the C++ and PyTorch paths
    HAS_TRITON = False

    class _TritonStandIn:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

    class _LanguageStandIn:
        constexpr = object  # only ever used as an annotation

    triton = _TritonStandIn()
    tl = _LanguageStandIn()

__all__ = ["HAS_TRITON", "tl", "triton"]
