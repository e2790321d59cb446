"""Grouped mixture-of-experts: routing, permutation, grouped GEMM, fused SwiGLU expert MLP, load balancing.

``offsets`` are int32 cumulative ends of the expert groups (``offsets[-1] == T*k``), computed on the device:
no host sync on the GPU path. The expert GEMMs are the whole cost of a layer (`experts` has the data flow).

Modules, each in the order reference -> kernels -> launchers -> registered op -> public function:
``reference`` (plain PyTorch, the ``torch`` backend), ``validation`` (argument checks and the one table of
backend -> engines), ``routing``, ``permutation`` (not ``permute``: that name is the function), ``gemm_kernels`` (Triton grouped GEMMs), ``gemm``
(``grouped_mm`` on every engine), ``cpu`` (the cpu engine of the expert MLP), ``experts`` (``moe_mlp``,
``moe_experts``).

Backends (chosen in ``sphinx_kernels._backend``; ``validation.ENGINES`` says what each runs): ``cuda``
(compiled permutation + Triton GEMMs), ``megablocks`` (grouped_gemm's GEMMs, bf16), ``triton``, ``cpu``
(compiled permutation, per-expert GEMMs, fused SwiGLU passes), ``grouped_mm`` (``torch._grouped_mm``),
``torch`` (the reference loop over experts).
"""

from sphinx_kernels.moe.experts import moe_experts, moe_mlp
from sphinx_kernels.moe.gemm import grouped_mm
from sphinx_kernels.moe.permutation import permute, unpermute

# grouped_mm_ref, permute_ref, route_ref, unpermute_ref: reachable as moe.<name> (tests, benchmarks), not
# exported by sphinx_kernels.
from sphinx_kernels.moe.reference import (  # noqa: F401
    MoEAux,
    grouped_mm_ref,
    load_balancing_loss,
    moe_experts_ref,
    moe_mlp_ref,
    permute_ref,
    route_ref,
    unpermute_ref,
)
from sphinx_kernels.moe.routing import route

# Exactly what sphinx_kernels exports from this family.
__all__ = [
    "MoEAux",
    "grouped_mm",
    "load_balancing_loss",
    "moe_experts",
    "moe_experts_ref",
    "moe_mlp",
    "moe_mlp_ref",
    "permute",
    "route",
    "unpermute",
]
