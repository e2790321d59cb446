"""Grouped MoE: routing, permutation, grouped GEMM, fused SwiGLU experts, load balancing.

Every backend that runs here (torch, triton through the interpreter, cpu, grouped_mm) is checked against an
independent float64 loop over experts written in this file, forward and backward, on seeded random inputs;
outputs are poisoned (deterministic mode fills every fresh allocation with NaN, in Python and C++ alike);
data movement is checked bit-exactly.
"""

import importlib.util
import os

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close_to_reference, run_python
from hypothesis import HealthCheck, given, settings

import sphinx_kernels
from sphinx_kernels import _backend, moe
from sphinx_kernels.moe import validation

CPU_BACKENDS = ["torch", "triton", "grouped_mm"] + (
    ["cpu"] if _backend.extension_has_kernel("moe_permute", "CPU") else []
)
GEMM_BACKENDS = CPU_BACKENDS
HAS_MEGABLOCKS = importlib.util.find_spec("megablocks") is not None


@pytest.fixture(autouse=True)
def poisoned():
    """Every torch.empty (and at::empty in the extension) is NaN-filled: unwritten output shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def _ext_or_skip(backend):
    if backend == "cpu" and "cpu" not in CPU_BACKENDS:
        pytest.skip("compiled extension not built")


# ----------------------------------------------------------------------------------------------------
# The independent reference: a plain loop over experts (and over tokens for the routing).
# ----------------------------------------------------------------------------------------------------


def loop_moe(x, router_weight, w1, w3, w2, top_k, expert_mask=None, ids=None):
    """Returns (out, router probs, expert ids) computed in x's dtype with fp32 (or fp64) routing.

    `ids`: use these experts instead of the top-k (low-precision tests: a near-tie between the k-th and the
    next expert may legitimately flip with the logits' rounding; the fp32 tests check the choice itself)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = (x @ router_weight.T).to(acc)
    if expert_mask is not None:
        logits = torch.where(expert_mask, logits, torch.full_like(logits, float("-inf")))
    probs = logits.softmax(-1)
    if ids is None:
        top, ids = probs.topk(top_k, dim=-1)
    else:
        top = probs.gather(-1, ids)
    weights = top / top.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=acc)
    for e in range(w1.shape[0]):
        # The expert's (token, slot) pairs in token order; one gather of their weights (a per-pair stack of
        # scalars cost ~80% of this reference's time in autograd nodes).
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        ye = (F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e]
        out = out.index_add(0, tok, ye.to(acc) * weights[tok, slot].to(acc)[:, None])
    return out.to(x.dtype), probs, ids


def make_inputs(T, d, f, E, *, seed, dtype=torch.float32, empty=(), only=None):
    """Random MoE inputs. Column 0 of x is a constant 1 so the router can be steered: experts in `empty` get a
    logit of -30 (never chosen), `only` gets +30 (always first)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    x[:, 0] = 1.0
    rw = torch.randn(E, d, generator=g)
    rw[:, 0] = torch.randn(E, generator=g)
    for e in empty:
        rw[e, 0] = -30.0
    if only is not None:
        rw[only, 0] = 30.0
    w1 = torch.randn(E, d, f, generator=g) / d**0.5
    w3 = torch.randn(E, d, f, generator=g) / d**0.5
    w2 = torch.randn(E, f, d, generator=g) / f**0.5
    return [t.to(dtype) for t in (x, rw, w1, w3, w2)]


CASES = {
    # name: (T, d, f, E, top_k, kwargs)
    "odd": (13, 17, 19, 4, 2, {}),
    "round": (32, 32, 64, 4, 2, {}),
    "empty_experts": (11, 9, 21, 6, 2, {"empty": (1, 4)}),
    "one_expert": (10, 8, 16, 3, 1, {"only": 2}),
    "E1": (7, 12, 10, 1, 1, {}),
    "topk_E": (9, 10, 11, 3, 3, {}),
    "pruned": (12, 11, 13, 5, 2, {"mask": (True, False, True, False, True)}),
    # Several M tiles per expert, K loops with a tail, several N tiles (interpreter blocks are 16 x 32 x 32).
    "multi_tile": (40, 45, 70, 3, 2, {}),
}


def _run(backend, inputs, top_k, mask, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, aux = moe.moe_mlp(*leaves, top_k=top_k, expert_mask=mask, backend=backend)
    (out.float() * grad_out).sum().backward()
    return out, aux, [t.grad for t in leaves]


def _reference(inputs, top_k, mask, grad_out, dtype, ids=None):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out, probs, ids = loop_moe(*leaves, top_k=top_k, expert_mask=mask, ids=ids)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    (out.to(acc) * grad_out.to(acc)).sum().backward()
    return out.detach(), probs.detach(), ids, [t.grad for t in leaves]


def assert_same_routing(ids, probs64, top_k):
    """`ids` choose the float64 top-k experts wherever the choice is not a near-tie: where the k-th and the
    next probability differ by less than 1e-6 (fp32 rounding of the router is ~1e-7), either is right."""
    top = probs64.topk(min(top_k + 1, probs64.shape[1]), dim=-1)
    clear = torch.ones(ids.shape[0], dtype=torch.bool)
    if top_k < probs64.shape[1]:
        clear = (top.values[:, top_k - 1] - top.values[:, top_k]) > 1e-6
    same = torch.equal(ids[clear].sort(-1).values, top.indices[clear, :top_k].sort(-1).values)
    assert same, "routing differs from the float64 loop"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_moe_mlp_against_loop(backend, case, seed):
    T, d, f, E, k, kw = CASES[case]
    mask = torch.tensor(kw["mask"]) if "mask" in kw else None
    inputs = make_inputs(T, d, f, E, seed=seed, empty=kw.get("empty", ()), only=kw.get("only"))
    grad_out = torch.randn(T, d)
    out, aux, grads = _run(backend, inputs, k, mask, grad_out)
    ids = aux.expert_ids
    # The references follow our routing (a near-tie may flip with rounding); the routing is checked apart.
    ref64, probs64, _, grads64 = _reference(inputs, k, mask, grad_out, torch.float64, ids=ids)
    ref32, probs32, _, grads32 = _reference(inputs, k, mask, grad_out, torch.float32, ids=ids)

    assert_same_routing(ids, probs64, k)
    assert_close_to_reference(out, ref64, ref32, name="out")
    for name, g, g64, g32 in zip(
        ("x", "router_weight", "w1", "w3", "w2"), grads, grads64, grads32, strict=True
    ):
        assert g is not None and torch.isfinite(g).all(), f"grad {name} missing or poisoned"
        assert_close_to_reference(g, g64, g32, name=f"grad {name}")
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert torch.equal(aux.tokens_per_expert.long(), counts)
    assert_close_to_reference(aux.router_probs, probs64, probs32, name="router probs")
    if "empty" in kw:
        assert all(counts[e] == 0 for e in kw["empty"])
    if "only" in kw:
        assert counts[kw["only"]] == T
    if mask is not None:
        assert not torch.isin(aux.expert_ids, (~mask).nonzero().flatten()).any()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_moe_mlp_fp16_within_2x_reference_error(backend, seed):
    T, d, f, E, k = 21, 24, 40, 4, 2
    inputs = make_inputs(T, d, f, E, seed=seed)
    grad_out = torch.randn(T, d)
    half = [t.half() for t in inputs]
    out, aux, grads = _run(backend, half, k, None, grad_out)
    ids = aux.expert_ids
    ref64, _, _, grads64 = _reference(half, k, None, grad_out, torch.float64, ids=ids)
    ref16, _, _, grads16 = _reference(half, k, None, grad_out, torch.float16, ids=ids)
    assert out.dtype == torch.float16
    assert_close_to_reference(out, ref64, ref16, name="fp16 out")
    for name, g, g64, g16 in zip(
        ("x", "router_weight", "w1", "w3", "w2"), grads, grads64, grads16, strict=True
    ):
        assert g.dtype == torch.float16
        assert_close_to_reference(g, g64, g16, name=f"fp16 grad {name}")


def _experts_extended(x, ids, weights, w1, w3, w2):
    """`moe_experts` in numpy's long double (x86-64: 64-bit mantissa, 11 bits past float64), rounded to
    float64 once: the exact answer for float64 kernels, whose float64 yardstick has errors of its own."""
    import numpy as np

    xl, w1l, w3l, w2l, wl = (
        t.detach().double().numpy().astype(np.longdouble) for t in (x, w1, w3, w2, weights)
    )
    out = np.zeros(xl.shape, dtype=np.longdouble)
    for t, row in enumerate(ids.tolist()):
        for j, e in enumerate(row):
            a = xl[t] @ w1l[e]
            out[t] += wl[t, j] * ((a / (1 + np.exp(-a)) * (xl[t] @ w3l[e])) @ w2l[e])
    return torch.from_numpy(out.astype(np.float64))


def test_moe_mlp_float64_on_the_cpu_and_torch_backends(seed):
    """float64 runs on the backends whose GEMMs have it (cpu, torch) and is refused by the others. Routing
    weights are float32 by contract (Mixtral's fp32 router), so the exact answer is the experts in long double
    given that routing, with the float64 loop on the same routing (`moe_mlp_ref`) as the yardstick (judged by
    the floor alone, a float64 reference's own rounding failed 1 seed in ~600: 667352126)."""
    inputs = [t.double() for t in make_inputs(9, 10, 12, 3, seed=seed)]
    same_routing, aux = moe.moe_mlp_ref(*inputs, top_k=2)
    weights, _, _ = moe.route_ref(inputs[0] @ inputs[1].T, 2)
    exact = _experts_extended(inputs[0], aux.expert_ids, weights, *inputs[2:])
    for backend in CPU_BACKENDS:
        if backend in ("cpu", "torch"):
            with torch.no_grad():
                out, _ = moe.moe_mlp(*inputs, top_k=2, backend=backend)
            assert out.dtype == torch.float64
            assert_close_to_reference(out, exact, same_routing, name=f"{backend} float64")
        else:
            with pytest.raises(TypeError, match=f"the {backend} backend runs float32"):
                moe.moe_mlp(*inputs, top_k=2, backend=backend)


def _experts_loop(x, ids, weights, w1, w3, w2):
    """out[t] = sum_j weights[t, j] * swiglu_{ids[t, j]}(x[t]): per expert one matmul over its (token, slot)
    pairs in token order (a row-by-row loop would round dW differently from any GEMM)."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        ye = (F.silu(x[tok] @ w1[e]) * (x[tok] @ w3[e])) @ w2[e]
        out = out.index_add(0, tok, ye * weights[tok, slot][:, None])
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_moe_experts_given_routing(backend, seed):
    """The experts with the caller's routing (a Hugging Face router's): forward and the gradients of x, the
    routing weights and the expert weights; expert 4 gets no token; transposed weight views as checkpoints
    store them."""
    T, d, f, E, k = 14, 11, 18, 5, 2
    x, _, w1, w3, w2 = make_inputs(T, d, f, E, seed=seed)
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    grad_out = torch.randn(T, d)
    stored = [w.transpose(1, 2).contiguous() for w in (w1, w3, w2)]  # (E, out, in) like nn.Linear

    def run(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weights, *stored)]
        xx, ww, *ws = leaves
        out = fn(xx, ids, ww, *[w.transpose(1, 2) for w in ws])
        (out.to(torch.float64) * grad_out.double()).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out, grads = run(torch.float32, lambda *a: moe.moe_experts(*a, backend=backend))
    ref64, grads64 = run(torch.float64, _experts_loop)
    ref32, grads32 = run(torch.float32, _experts_loop)
    assert_close_to_reference(out, ref64, ref32, name="out")
    for name, gr, g64, g32 in zip(("x", "weights", "w1", "w3", "w2"), grads, grads64, grads32, strict=True):
        assert_close_to_reference(gr, g64, g32, name=f"grad {name}")
    assert (grads[2][4] == 0).all() and (grads[4][4] == 0).all(), "the unused expert got a gradient"
    with pytest.raises(ValueError, match="weights"):
        moe.moe_experts(x, ids, weights[:, :1], w1, w3, w2, backend=backend)


@pytest.mark.parametrize("layout", ["nn.Linear (E, 2f, d)", "ours (E, d, 2f)"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_moe_experts_fused_gate_up_weight(backend, layout, seed):
    """w3=None: w1 is the fused gate|up weight (Mixtral's gate_up_proj). Forward and every gradient against
    the float64 loop on its halves, in nn.Linear's layout (a transposed view) and ours; expert 4 gets no
    token; f odd."""
    T, d, f, E, k = 15, 10, 13, 5, 2
    x, _, w1, w3, w2 = make_inputs(T, d, f, E, seed=seed)
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    grad_out = torch.randn(T, d)
    linear = layout.startswith("nn.Linear")
    fused = torch.cat([w1, w3], dim=-1)  # (E, d, 2f)
    stored = fused.transpose(1, 2).contiguous() if linear else fused  # what the checkpoint holds

    def run(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weights, stored, w2)]
        xx, ww, gate_up, down = leaves
        out = fn(xx, ww, gate_up.transpose(1, 2) if linear else gate_up, down)
        (out.to(torch.float64) * grad_out.double()).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out, grads = run(
        torch.float32,
        lambda xx, ww, w13, down: moe.moe_experts(xx, ids, ww, w13, None, down, backend=backend),
    )
    loop = lambda xx, ww, w13, down: _experts_loop(xx, ids, ww, w13[..., :f], w13[..., f:], down)  # noqa: E731
    ref64, grads64 = run(torch.float64, loop)
    ref32, grads32 = run(torch.float32, loop)
    assert_close_to_reference(out, ref64, ref32, name="out")
    for name, gr, g64, g32 in zip(("x", "weights", "gate_up", "w2"), grads, grads64, grads32, strict=True):
        assert_close_to_reference(gr, g64, g32, name=f"grad {name}")
    assert (grads[2][4] == 0).all(), "the unused expert got a gradient"
    # Inference with frozen weights, autograd on (nothing requires grad): the same forward.
    frozen = moe.moe_experts(
        x, ids, weights, stored.transpose(1, 2) if linear else stored, None, w2, backend=backend
    )
    assert_close_to_reference(frozen, ref64, ref32, name="frozen out")
    with pytest.raises(ValueError, match="w1 with w3=None is the fused gate.up weight"):
        moe.moe_experts(x, ids, weights, fused[..., 1:], None, w2, backend=backend)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_moe_mlp_transposed_weight_views(backend, seed):
    # Checkpoints store expert weights (f, d) per expert (nn.Linear): users pass w1 as a transposed view.
    inputs = make_inputs(10, 12, 14, 3, seed=seed)
    x, rw = inputs[:2]
    views = [w.transpose(1, 2).contiguous().requires_grad_() for w in inputs[2:]]
    grad_out = torch.randn(10, 12)
    out, aux = moe.moe_mlp(x, rw, *[v.transpose(1, 2) for v in views], top_k=2, backend=backend)
    (out * grad_out).sum().backward()
    ref64, _, _, grads64 = _reference(inputs, 2, None, grad_out, torch.float64, ids=aux.expert_ids)
    ref32, _, _, grads32 = _reference(inputs, 2, None, grad_out, torch.float32, ids=aux.expert_ids)
    assert_close_to_reference(out, ref64, ref32, name="out")
    for name, v, g64, g32 in zip(("w1", "w3", "w2"), views, grads64[2:], grads32[2:], strict=True):
        assert_close_to_reference(v.grad.transpose(1, 2), g64, g32, name=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_moe_mlp_no_tokens(backend, seed):
    x, rw, w1, w3, w2 = [t.requires_grad_() for t in make_inputs(0, 8, 16, 3, seed=seed)]
    out, aux = moe.moe_mlp(x, rw, w1, w3, w2, top_k=2, backend=backend)
    assert out.shape == (0, 8) and aux.tokens_per_expert.tolist() == [0, 0, 0]
    (out.sum() + aux.load_balancing_loss).backward()
    for t in (w1, w3, w2):
        assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))


def _no_grad_against_loop(inputs, top_k, **kwargs):
    """`moe_mlp` without autograd against the float64 / float32 loops on its own routing."""
    with torch.no_grad():
        out, aux = moe.moe_mlp(*inputs, top_k=top_k, **kwargs)
    grad_out = torch.zeros(out.shape)
    ref64 = _reference(inputs, top_k, None, grad_out, torch.float64, ids=aux.expert_ids)[0]
    ref32 = _reference(inputs, top_k, None, grad_out, torch.float32, ids=aux.expert_ids)[0]
    assert_close_to_reference(out, ref64, ref32, name=f"out (top_k {top_k})")


def test_moe_mlp_automatic_backend_choice(seed):
    inputs = make_inputs(9, 10, 12, 3, seed=seed)
    _no_grad_against_loop(inputs, 2)
    assert validation.select(inputs[0].device, torch.float32, None) == (
        "cpu" if "cpu" in CPU_BACKENDS else "grouped_mm"
    )
    # float64: the automatic choice skips the backends without it.
    assert validation.select(inputs[0].device, torch.float64, None) == (
        "cpu" if "cpu" in CPU_BACKENDS else "torch"
    )


def test_backend_forced_by_environment(monkeypatch, seed):
    inputs = make_inputs(6, 8, 10, 3, seed=seed)
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "moe:megablocks")
    with pytest.raises(RuntimeError, match="megablocks"):  # forced and missing: an error, not a fallback
        moe.moe_mlp(*inputs, top_k=2)
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "tiles:cpu,moe:torch")
    assert validation.select(inputs[0].device, torch.float32, None) == "torch"
    _no_grad_against_loop(inputs, 2)


def test_moe_mlp_eval_topk_differs_from_training(seed):
    # SPHINX-MoE evaluates 1..E active experts at inference; every top_k must agree with the loop.
    inputs = make_inputs(8, 9, 10, 4, seed=seed)
    for k in range(1, 5):
        _no_grad_against_loop(inputs, k, backend=CPU_BACKENDS[-1])


# ----------------------------------------------------------------------------------------------------
# grouped_mm alone.
# ----------------------------------------------------------------------------------------------------


def loop_grouped_mm(x, w, ends):
    """The plain loop over experts, one matmul per group (the PyTorch reference of the 2x rule)."""
    parts = [torch.zeros(0, w.shape[-1], dtype=x.dtype) + 0 * (x.sum() + w.sum())]  # grads even for M=0
    for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        parts.append(x[start:end] @ w[e])
    return torch.cat(parts)


GROUPS = {
    "odd": (23, 17, 19, [5, 5, 14, 23]),  # an empty group
    "one_group": (9, 8, 12, [0, 9, 9]),  # everything on expert 1
    "E1": (7, 5, 3, [7]),
    "round": (48, 32, 32, [16, 16, 40, 48]),
    "multi_tile": (70, 45, 70, [33, 33, 70]),
    "zero_rows": (0, 8, 8, [0, 0]),
}


@pytest.mark.parametrize("case", list(GROUPS))
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_grouped_mm_forward_backward(backend, case, seed):
    _ext_or_skip(backend)
    M, K, N, ends = GROUPS[case]
    x = torch.randn(M, K)
    w = torch.randn(len(ends), K, N)
    dy = torch.randn(M, N)
    offsets = torch.tensor(ends, dtype=torch.int32)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = sphinx_kernels.grouped_mm(xl, wl, offsets, backend=backend)
    (y * dy).sum().backward()

    results = {}
    for dtype in (torch.float64, torch.float32):
        xr, wr = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        yr = loop_grouped_mm(xr, wr, ends)
        (yr * dy.to(dtype)).sum().backward()
        results[dtype] = (yr.detach(), xr.grad, wr.grad)
    for name, got, r64, r32 in zip(
        ("y", "dx", "dw"), (y, xl.grad, wl.grad), results[torch.float64], results[torch.float32], strict=True
    ):
        assert got.shape == r64.shape and torch.isfinite(got).all(), f"{name} poisoned"
        assert_close_to_reference(got, r64, r32, name=name)
    # An expert with no rows gets an exactly zero weight gradient.
    counts = torch.diff(offsets, prepend=torch.zeros(1, dtype=torch.int32))
    assert (wl.grad[counts == 0] == 0).all()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
@pytest.mark.parametrize("backend", [b for b in GEMM_BACKENDS if b != "grouped_mm"])
def test_grouped_mm_matches_torch_grouped_mm(backend, seed):
    """Every backend within the rule with PyTorch's own grouped GEMM as the float32 yardstick."""
    _ext_or_skip(backend)
    x = torch.randn(40, 16)
    w = torch.randn(3, 16, 24)
    ends = [12, 12, 40]
    offsets = torch.tensor(ends, dtype=torch.int32)
    peer = torch._grouped_mm(x, w, offsets)
    ours = sphinx_kernels.grouped_mm(x, w, offsets, backend=backend)
    assert_close_to_reference(ours, loop_grouped_mm(x.double(), w.double(), ends), peer, name=backend)


@pytest.mark.parametrize("backend", [b for b in GEMM_BACKENDS if b != "torch"])
def test_grouped_mm_fp16_within_2x_reference_error(backend, seed):
    _ext_or_skip(backend)
    x = torch.randn(37, 24).half()
    w = torch.randn(3, 24, 40).half()
    ends = [10, 10, 37]
    offsets = torch.tensor(ends, dtype=torch.int32)
    y = sphinx_kernels.grouped_mm(x, w, offsets, backend=backend)
    assert y.dtype == torch.float16
    ref64 = loop_grouped_mm(x.double(), w.double(), ends)
    assert_close_to_reference(y, ref64, loop_grouped_mm(x, w, ends), name="fp16 y")


def test_grouped_mm_rejects_bad_input():
    x = torch.randn(10, 4)
    w = torch.randn(3, 4, 5)
    ok = torch.tensor([3, 3, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="offsets.*non-decreasing"):
        sphinx_kernels.grouped_mm(x, w, torch.tensor([3, 2, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="offsets.*end"):
        sphinx_kernels.grouped_mm(x, w, torch.tensor([3, 3, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="offsets.*one entry per expert"):
        sphinx_kernels.grouped_mm(x, w, torch.tensor([3, 10], dtype=torch.int32))
    with pytest.raises(TypeError, match="offsets.*int32"):
        sphinx_kernels.grouped_mm(x, w, ok.long())
    with pytest.raises(TypeError, match="w must have x's dtype"):
        sphinx_kernels.grouped_mm(x, w.double(), ok)
    with pytest.raises(ValueError, match="w must have shape"):
        sphinx_kernels.grouped_mm(x, torch.randn(3, 5, 5), ok)
    with pytest.raises(ValueError, match="x must be 2-D"):
        sphinx_kernels.grouped_mm(x[None], w, ok)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sphinx_kernels.grouped_mm(x.tolist(), w, ok)


@pytest.mark.skipif(not HAS_MEGABLOCKS or not HAS_CUDA, reason="megablocks and a GPU needed")
@pytest.mark.gpu
def test_grouped_mm_megablocks_matches_loop(seed):
    x = torch.randn(64, 64).bfloat16()
    w = torch.randn(4, 64, 64).bfloat16()
    ends = [10, 10, 50, 64]
    offsets = torch.tensor(ends, dtype=torch.int32, device="cuda")
    y = sphinx_kernels.grouped_mm(x.cuda(), w.cuda(), offsets, backend="megablocks")
    ref64 = loop_grouped_mm(x.double(), w.double(), ends)
    assert_close_to_reference(y.cpu(), ref64, loop_grouped_mm(x, w, ends), name="megablocks y")


# ----------------------------------------------------------------------------------------------------
# route, permute, unpermute, load balancing.
# ----------------------------------------------------------------------------------------------------


def test_route_topk_renormalised_and_pruning(seed):
    logits = torch.randn(50, 8)
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    for k in range(1, 7):
        w, ids = sphinx_kernels.route(logits.half(), k, expert_mask=mask)
        assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == (50, k)
        assert not torch.isin(ids, torch.tensor([1, 4])).any()
        probs = torch.softmax(logits.half().float().masked_fill(~mask, float("-inf")), -1)
        expected = probs.topk(k, -1)
        assert torch.equal(ids, expected.indices)
        top64 = torch.softmax(logits.half().double().masked_fill(~mask, float("-inf")), -1).gather(-1, ids)
        ref32 = expected.values / expected.values.sum(-1, keepdim=True)
        assert_close_to_reference(w, top64 / top64.sum(-1, keepdim=True), ref32, name=f"weights (k {k})")
    with pytest.raises(ValueError, match="top_k must be in 1..6"):
        sphinx_kernels.route(logits, 7, expert_mask=mask)
    with pytest.raises(ValueError, match="top_k"):
        sphinx_kernels.route(logits, 0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        sphinx_kernels.route(logits, 2.0)
    with pytest.raises(TypeError, match="expert_mask"):
        sphinx_kernels.route(logits, 2, expert_mask=mask.int())
    with pytest.raises(ValueError, match="expert_mask must have shape"):
        sphinx_kernels.route(logits, 2, expert_mask=mask[:5])


def expected_permutation(x, ids, E):
    rows = [
        (t, j) for e in range(E) for t in range(ids.shape[0]) for j in range(ids.shape[1]) if ids[t, j] == e
    ]
    ends = torch.tensor([int((ids <= e).sum()) for e in range(E)])
    return rows, ends


PERMUTE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", PERMUTE_DTYPES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_permute_unpermute_bit_exact(backend, dtype, seed):
    _ext_or_skip(backend)
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 is wrong in Triton's interpreter (GPU test covers it)")
    g = torch.Generator().manual_seed(seed)
    T, d, E, k = 19, 13, 5, 3
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[ids == 3] = 0  # expert 3 gets no token
    x_sorted, row_map, offsets = sphinx_kernels.permute(x, ids, E, backend=backend)
    rows, ends = expected_permutation(x, ids, E)
    assert offsets.dtype == torch.int32 and torch.equal(offsets.long(), ends)
    assert torch.equal(x_sorted, torch.stack([x[t] for t, _ in rows]))  # stable, bit-exact
    for i, (t, j) in enumerate(rows):
        assert row_map[t, j] == i
    # Round trip with one-hot weights is exact: 1*x + 0*x == x.
    onehot = torch.zeros(T, k)
    onehot[torch.arange(T), torch.randint(0, k, (T,), generator=g)] = 1.0
    assert torch.equal(sphinx_kernels.unpermute(x_sorted, row_map, onehot, backend=backend), x)
    weights = torch.rand(T, k, generator=g)
    out = sphinx_kernels.unpermute(x_sorted, row_map, weights, backend=backend)
    ref64 = (weights.double()[..., None] * x.double()[:, None, :]).sum(1)
    assert_close_to_reference(out, ref64, moe.unpermute_ref(x_sorted, row_map, weights), name="weighted sum")


@pytest.mark.parametrize("d", [7, 133])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_permute_unpermute_gradients(backend, d, seed):
    _ext_or_skip(backend)
    T, E, k = 9, 4, 2
    x0 = torch.randn(T, d)
    ids = torch.randint(0, E, (T, k))
    w0 = torch.rand(T, k)
    dout = torch.randn(T, d)

    def grads(name):
        x, weights = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        x_sorted, row_map, _ = sphinx_kernels.permute(x, ids, E, backend=name)
        y = x_sorted * torch.arange(1, T * k + 1, dtype=torch.float32)[:, None]  # row-dependent
        (sphinx_kernels.unpermute(y, row_map, weights, backend=name) * dout).sum().backward()
        return x.grad, weights.grad, row_map

    dx, dw, row_map = grads(backend)
    dx32, dw32, _ = grads("torch")  # PyTorch's reference in float32
    scale = (row_map + 1).double()  # the factor each (token, slot) row was multiplied by
    dx64 = ((w0.double() * scale)[..., None] * dout.double()[:, None, :]).sum(1)
    dw64 = scale * (x0.double() * dout.double()).sum(-1)[:, None]
    assert_close_to_reference(dx, dx64, dx32, name="dx")
    assert_close_to_reference(dw, dw64, dw32, name="dweights")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tokens=st.integers(0, 40),
    d=st.integers(1, 9),
    E=st.integers(1, 6),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(["torch", "cpu", "triton"]),
)
def test_permute_round_trip_property(tokens, d, E, k, seed, backend):
    if backend == "cpu" and "cpu" not in CPU_BACKENDS:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    ids = torch.randint(0, E, (tokens, k), generator=g)  # repeats allowed: permute does not need distinct ids
    x_sorted, row_map, offsets = sphinx_kernels.permute(x, ids, E, backend=backend)
    assert torch.equal(x_sorted[row_map.reshape(-1)], x.repeat_interleave(k, 0))
    assert torch.equal(torch.sort(row_map.reshape(-1)).values, torch.arange(tokens * k))
    assert torch.equal(offsets.long(), torch.bincount(ids.reshape(-1), minlength=E).cumsum(0))
    sorted_ids = ids.reshape(-1)[torch.argsort(row_map.reshape(-1))]
    assert bool((sorted_ids.diff() >= 0).all())
    if tokens:
        onehot = F.one_hot(torch.randint(0, k, (tokens,), generator=g), k).float()
        assert torch.equal(sphinx_kernels.unpermute(x_sorted, row_map, onehot, backend=backend), x)


def test_permute_rejects_bad_input():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="expert_ids must lie in"):
        sphinx_kernels.permute(x, torch.tensor([[0], [1], [4], [0], [1]]), 4)
    with pytest.raises(ValueError, match="expert_ids has 4 rows"):
        sphinx_kernels.permute(x, torch.zeros(4, 1, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="expert_ids"):
        sphinx_kernels.permute(x, torch.zeros(5, 1), 4)
    with pytest.raises(ValueError, match="num_experts"):
        sphinx_kernels.permute(x, torch.zeros(5, 1, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="weights"):
        sphinx_kernels.unpermute(torch.randn(10, 3), torch.zeros(5, 2, dtype=torch.int64), torch.ones(5, 3))


def test_load_balancing_loss(seed):
    T, E, k = 16, 4, 2
    ids = torch.tensor([[e, (e + 1) % E] for e in range(E)] * (T // E))  # every expert 8 times
    probs = torch.full((T, E), 1.0 / E)
    balanced = sphinx_kernels.load_balancing_loss(probs, ids)
    assert_close_to_reference(balanced, torch.tensor(1.0, dtype=torch.float64), name="balanced loss")
    logits = torch.randn(T, E)
    counts = torch.bincount(ids.flatten(), minlength=E)

    def formula(dtype):
        return E / (T * k) * (counts.to(dtype) * torch.softmax(logits.to(dtype), -1).mean(0)).sum()

    loss = sphinx_kernels.load_balancing_loss(torch.softmax(logits, -1), ids)
    assert_close_to_reference(loss, formula(torch.float64), formula(torch.float32), name="loss")
    skewed = torch.zeros(T, k, dtype=torch.int64)
    skewed[:, 1] = 1
    one_hot = torch.zeros(T, E)
    one_hot[:, :2] = 0.5
    assert sphinx_kernels.load_balancing_loss(one_hot, skewed) > 1.9  # imbalance is penalised (E/2 = 2)


def test_moe_mlp_rejects_bad_input(seed):
    x, rw, w1, w3, w2 = make_inputs(6, 8, 10, 4, seed=seed)
    with pytest.raises(TypeError, match="w1 must have x's dtype"):
        moe.moe_mlp(x, rw, w1.double(), w3, w2)
    with pytest.raises(TypeError, match="router_weight must have x's dtype"):
        moe.moe_mlp(x, rw.half(), w1, w3, w2)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        moe.moe_mlp(x, rw[:, :5], w1, w3, w2)
    with pytest.raises(ValueError, match="w1 must have shape"):
        moe.moe_mlp(x, rw, w1[:, :5], w3, w2)
    with pytest.raises(ValueError, match="w3 must have w1's shape"):
        moe.moe_mlp(x, rw, w1, w3[..., :5], w2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        moe.moe_mlp(x, rw, w1, w3, w2[:3])
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        moe.moe_mlp(x, rw, w1, w3, w2, top_k=5)
    with pytest.raises(ValueError, match="top_k must be in 1..2"):
        moe.moe_mlp(x, rw, w1, w3, w2, top_k=3, expert_mask=torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match="x must be 2-D"):
        moe.moe_mlp(x[None], rw, w1, w3, w2)
    with pytest.raises(ValueError, match="backend='megatron' does not implement moe"):
        moe.moe_mlp(x, rw, w1, w3, w2, backend="megatron")


# ----------------------------------------------------------------------------------------------------
# torch.compile and opcheck.
# ----------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_through_moe_mlp(seed):
    torch.use_deterministic_algorithms(False)  # inductor's generated kernels need no poisoning here
    backend = "cpu" if "cpu" in CPU_BACKENDS else "torch"  # both run float64 for the yardstick
    inputs = make_inputs(13, 17, 19, 4, seed=seed)

    def layer(x, rw, w1, w3, w2):
        out, aux = moe.moe_mlp(x, rw, w1, w3, w2, top_k=2, backend=backend)
        return (out * out).sum() + 0.01 * aux.load_balancing_loss

    # The default (inductor) backend: ~30 s of C++ code generation on 2 cores, but it is what users run.
    compiled = torch.compile(layer, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    compiled(*leaves).backward()
    # Yardsticks: the same layer eager in float64 and in float32 (same routing: the router runs in fp32).
    grads = {}
    for dtype in (torch.float64, torch.float32):
        eager = [t.to(dtype).requires_grad_() for t in inputs]
        layer(*eager).backward()
        grads[dtype] = [t.grad for t in eager]
    for name, a, g64, g32 in zip(
        ("x", "router_weight", "w1", "w3", "w2"),
        leaves,
        grads[torch.float64],
        grads[torch.float32],
        strict=True,
    ):
        assert_close_to_reference(a.grad, g64, g32, name=f"compiled grad {name}")


def _opcheck_samples(backend, seed):
    """Every registered op on the engines behind `backend` (`validation.ENGINES`)."""
    permute_engine, gemm_engine, _ = validation.ENGINES[backend]
    x, rw, w1, w3, w2 = make_inputs(11, 16, 24, 3, seed=seed)
    ids = torch.tensor([[0, 2], [2, 0]] * 5 + [[2, 0]])
    x_sorted, row_map, offsets = moe.permute_ref(x, ids, 3)
    weights = torch.rand(11, 2)
    y = torch.randn(22, 16)
    return [
        (torch.ops.sphinx_kernels.permute, (x.requires_grad_(), ids, 3, permute_engine)),
        (
            torch.ops.sphinx_kernels.unpermute,
            (y.requires_grad_(), row_map, weights.requires_grad_(), permute_engine),
        ),
        (
            torch.ops.sphinx_kernels.grouped_mm,
            (x_sorted.clone().requires_grad_(), w1.clone().requires_grad_(), offsets, gemm_engine),
        ),
        (torch.ops.sphinx_kernels.grouped_mm_dw, (x_sorted, torch.randn(22, 24), offsets, gemm_engine)),
        (
            torch.ops.sphinx_kernels.moe_experts,
            (
                x_sorted.clone().requires_grad_(),
                w1,
                w3.requires_grad_(),
                w2.requires_grad_(),
                offsets,
                gemm_engine,
                True,
            ),
        ),
        (  # the fused gate|up weight (w3 None), as a transposed view of nn.Linear's (E, 2f, d)
            torch.ops.sphinx_kernels.moe_experts,
            (
                x_sorted.clone().requires_grad_(),
                torch.cat([w1, w3], -1).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(),
                None,
                w2.clone().requires_grad_(),
                offsets,
                gemm_engine,
                True,
            ),
        ),
    ]


@pytest.mark.parametrize("backend", ["cpu", "grouped_mm", "triton"])
def test_opcheck_registered_ops(backend, seed):
    _ext_or_skip(backend)
    torch.use_deterministic_algorithms(False)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in _opcheck_samples(backend, seed):
        torch.library.opcheck(op, args, test_utils=tests)


def test_opcheck_extension_ops(seed):
    _ext_or_skip("cpu")
    torch.use_deterministic_algorithms(False)
    x = torch.randn(7, 5)
    ids = torch.randint(0, 3, (7, 2))
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_permute, (x, ids, 3))
    x_sorted, row_map, _ = torch.ops.sphinx_kernels.moe_permute(x, ids, 3)
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_unpermute, (x_sorted, row_map, torch.rand(7, 2)))
    args = (torch.randn(7, 5), x_sorted, row_map, torch.rand(7, 2))
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_unpermute_backward, args)


def _swiglu_extended(a1, a3, dh):
    """(h, d a1, d a3) in numpy's long double (x86-64: 64-bit mantissa, 11 bits past float64), rounded to
    float64: the exact answer for judging float64 kernels, whose float64 yardstick has errors of its own."""
    import numpy as np

    a, u, g = (t.double().numpy().astype(np.longdouble) for t in (a1, a3, dh))
    sig = 1 / (1 + np.exp(-a))
    out = (a * sig * u, g * u * sig * (1 + a * (1 - sig)), g * a * sig)
    return [torch.from_numpy(t.astype(np.float64)) for t in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_swiglu_cpu_kernels_against_float64(dtype, seed):
    """The cpu engine's fused SwiGLU passes (its own exp) against float64, on an odd size (vector tails) with
    magnitudes up to 100 (the exp's clamping range) and exact zeros; within the rule with PyTorch's ops in
    that dtype as the yardstick (float64: against long double, PyTorch's float64 ops the yardstick)."""
    _ext_or_skip("cpu")
    a1, a3, dh = (torch.randn(37, 29) * 8 for _ in range(3))
    a1[0, :8] = torch.tensor([100.0, -100.0, 88.5, -87.5, 0.0, 1e-30, -20.0, 20.0])
    a1, a3, dh = (t.to(dtype) for t in (a1, a3, dh))
    g64, up64 = a1.double().clone().requires_grad_(), a3.double().clone().requires_grad_()
    h64 = F.silu(g64) * up64
    h64.backward(dh.double())
    refs = [h64.detach(), g64.grad, up64.grad]
    g, up = a1.clone().requires_grad_(), a3.clone().requires_grad_()  # PyTorch's own ops in that dtype
    h_ref = F.silu(g) * up
    h_ref.backward(dh)
    lowp = [h_ref.detach(), g.grad, up.grad]
    if dtype == torch.float64:
        refs = _swiglu_extended(a1, a3, dh)

    h = torch.empty_like(a1)
    torch.ops.sphinx_kernels.swiglu_out(a1, a3, h)
    da1, da3, h_again = dh.clone(), torch.empty_like(a1), torch.empty_like(a1)
    torch.ops.sphinx_kernels.swiglu_backward_(da1, a1, a3, da3, h_again)  # dh -> da1 in place
    for name, got, ref, low in zip(("h", "da1", "da3"), (h, da1, da3), refs, lowp, strict=True):
        assert_close_to_reference(got, ref, low, name=name)
    assert torch.equal(h_again, h)  # the backward's recomputed h is the forward's, bit for bit


def test_swiglu_cpu_kernels_propagate_nan_and_reject_bad_input():
    _ext_or_skip("cpu")
    a1 = torch.tensor([float("nan"), float("inf"), 1.0, -3.0])
    a3 = torch.ones(4)
    h = torch.empty(4)
    torch.ops.sphinx_kernels.swiglu_out(a1, a3, h)
    assert h[0].isnan() and h[1] == float("inf")
    assert_close_to_reference(h[2:], F.silu(a1[2:].double()), F.silu(a1[2:]), name="finite h")
    ops = torch.ops.sphinx_kernels
    with pytest.raises(RuntimeError, match="h must have a1's shape"):
        ops.swiglu_out(a1, a3, torch.empty(5))
    with pytest.raises(RuntimeError, match="a3 must have a1's shape and dtype"):
        ops.swiglu_out(a1, a3.double(), h)
    with pytest.raises(RuntimeError, match="a1 must be a contiguous CPU tensor"):
        ops.swiglu_out(torch.ones(4, 2).T, torch.ones(2, 4), torch.empty(2, 4))
    with pytest.raises(RuntimeError, match="da3 must have a1's shape"):
        ops.swiglu_backward_(a3.clone(), a1, a3, torch.empty(3), torch.empty(4))
    with pytest.raises(RuntimeError, match="h must have a1's shape and dtype"):
        ops.swiglu_backward_(a3.clone(), a1, a3, torch.empty(4), torch.empty(4).half())
    dh = torch.ones(4)
    with pytest.raises(RuntimeError, match="must not share memory"):
        ops.swiglu_backward_(dh, a1, a3, dh, torch.empty(4))


def test_opcheck_swiglu_kernels(seed):
    _ext_or_skip("cpu")
    torch.use_deterministic_algorithms(False)
    a1, a3, dh = torch.randn(3, 5, 7).unbind(0)
    torch.library.opcheck(torch.ops.sphinx_kernels.swiglu_out, (a1, a3, torch.empty(5, 7)))
    args = (dh, a1, a3, torch.empty(5, 7), torch.empty(5, 7))
    torch.library.opcheck(torch.ops.sphinx_kernels.swiglu_backward_, args)


def test_extension_registers_moe_kernels():
    """The C++ kernels are in the build: CPU always, CUDA wherever the build found nvcc (proves moe.cu
    compiled and linked even on a machine that cannot run it)."""
    from pathlib import Path

    from torch.utils.cpp_extension import CUDA_HOME

    assert _backend.extension_has_kernel("moe_permute", "CPU"), _backend._extension()[1]
    assert _backend.extension_has_kernel("moe_unpermute", "CPU")
    assert _backend.extension_has_kernel("swiglu_out", "CPU")
    assert _backend.extension_has_kernel("swiglu_backward_", "CPU")
    assert _backend.extension_has_kernel("moe_unpermute_backward", "CPU")
    nvcc = torch.version.cuda and CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists()
    if (
        nvcc
        and os.environ.get("SPHINX_KERNELS_CUDA") != "0"
        and _backend.extension_has_kernel("tile_gather_out", "CUDA")
    ):
        assert _backend.extension_has_kernel("moe_permute", "CUDA")
        assert _backend.extension_has_kernel("moe_unpermute", "CUDA")


AOT_SCRIPT = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sphinx_kernels.moe import gemm_kernels as moe, permutation

SMEM_SM90 = 232448  # bytes of shared memory per block on H100/H200

def build(fn, types, consts, target, ones=(), config=None):
    names = list(inspect.signature(fn.fn).parameters)
    options = {"num_warps": 4, "num_stages": 2}
    if config is not None:  # the autotuner's last config: the one that must fit for every mode and dtype
        consts = {**consts, **config.kwargs}
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    sig = {n: ("constexpr" if n in consts or n in ones else types.get(n, "i32")) for n in names}
    consts = {**consts, **{n: 1 for n in ones}}
    # What a real launch specialises: 16-divisible pointers and strides, unit strides as constants.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in consts and sig[n] != "constexpr"}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target, options=options)
    assert k.metadata.shared <= SMEM_SM90, (fn.fn.__name__, consts, k.metadata.shared)
    return k

gemm_fit, dw_fit = moe._gemm_configs()[-1], moe._dw_configs()[-1]

for arch in (90, 80):
    target = GPUTarget("cuda", arch, 32)
    for dtype in ("bf16", "fp32"):  # fp16 compiles as bf16 does; 10 s saved
        ptrs = {n: "*" + dtype for n in ("a_ptr", "a2_ptr", "b_ptr", "b2_ptr", "out_ptr", "out2_ptr", "aux1_ptr", "aux2_ptr")}
        ptrs["offsets_ptr"] = "*i32"
        precision = "ieee" if dtype == "fp32" else "tf32"
        for mode in (0, 1, 2, 3):
            ones = ("stride_ak", "stride_bn", "stride_b2n") if mode in (0, 1) else ("stride_ak", "stride_bk", "stride_b2k")
            k = build(moe._grouped_mm_kernel, ptrs, dict(MODE=mode, SAVE_PRE=mode == 1, PRECISION=precision, E_BLOCK=16),
                      target, ones, gemm_fit)
            if arch == 90 and dtype == "bf16" and mode == 1:
                ptx = k.asm["ptx"]
                assert "wgmma.mma_async" in ptx and "cp.async" in ptx, "fused GEMM lost wgmma or its cp.async pipeline"
        dw_ptrs = {n: "*" + dtype for n in ("a_ptr", "b_ptr", "b2_ptr", "out_ptr", "out2_ptr")}
        dw_ptrs["offsets_ptr"] = "*i32"
        for dual in (False, True):
            build(moe._grouped_dw_kernel, dw_ptrs, dict(DUAL=dual, PRECISION=precision), target,
                  ("stride_ak", "stride_bn"), dw_fit)
        build(permutation._gather_rows_kernel, {"src_ptr": "*" + dtype, "index_ptr": "*i64", "dst_ptr": "*" + dtype},
              dict(BLOCK_D=1024), target)
        build(permutation._unpermute_kernel, {"y_ptr": "*" + dtype, "row_map_ptr": "*i64", "w_ptr": "*fp32",
              "out_ptr": "*" + dtype}, dict(K_SLOTS=2, BLOCK_D=1024), target)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_compile_for_sm90_and_sm80(tmp_path):
    """The interpreter does not type-check like the compiler: compile every kernel variant ahead of time for
    Hopper and Ampere (no GPU needed) in a process without TRITON_INTERPRET, and check that the fused SwiGLU
    GEMM keeps wgmma with a cp.async pipeline on sm_90."""
    assert run_python(AOT_SCRIPT, tmp_path).strip().endswith("ok")


def test_exported_names():
    """moe.__all__ is exactly what sphinx_kernels exports from the family, the same objects."""
    from_moe = {
        n
        for n in sphinx_kernels.__all__
        if getattr(getattr(sphinx_kernels, n), "__module__", "").startswith("sphinx_kernels.moe")
    }
    assert from_moe == set(moe.__all__)
    assert all(getattr(sphinx_kernels, n) is getattr(moe, n) for n in moe.__all__)
    for name in (
        "route",
        "permute",
        "unpermute",
        "grouped_mm",
        "moe_mlp",
        "moe_experts",
        "load_balancing_loss",
        "MoEAux",
    ):
        assert name in moe.__all__, name


# ----------------------------------------------------------------------------------------------------
# GPU: bfloat16, the CUDA permutation kernels, the compiled Triton path.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "grouped_mm"])
def test_moe_mlp_bf16_gpu(backend, seed):
    if backend == "cuda" and not _backend.extension_has_kernel("moe_permute", "CUDA"):
        pytest.skip("extension built without CUDA")
    torch.use_deterministic_algorithms(False)
    T, d, f, E, k = 300, 128, 352, 8, 2
    inputs = make_inputs(T, d, f, E, seed=seed, empty=(5,))
    grad_out = torch.randn(T, d)
    leaves = [t.bfloat16().cuda().requires_grad_() for t in inputs]
    out, aux = moe.moe_mlp(*leaves, top_k=k, backend=backend)
    (out.float() * grad_out.cuda()).sum().backward()
    ids = aux.expert_ids.cpu()
    bf16 = [t.bfloat16() for t in inputs]
    ref64, _, _, grads64 = _reference(bf16, k, None, grad_out, torch.float64, ids=ids)
    ref16, _, _, grads16 = _reference(bf16, k, None, grad_out, torch.bfloat16, ids=ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert int(aux.tokens_per_expert[5]) == 0  # the steered-away expert: an empty group on the GPU path
    assert_close_to_reference(out.cpu(), ref64, ref16, name="bf16 out")
    for name, t, g64, g16 in zip(
        ("x", "router_weight", "w1", "w3", "w2"), leaves, grads64, grads16, strict=True
    ):
        assert_close_to_reference(t.grad.cpu(), g64, g16, name=f"bf16 grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_cuda_bit_exact(dtype, seed):
    if not _backend.extension_has_kernel("moe_permute", "CUDA"):
        pytest.skip("extension built without CUDA")
    T, d, E, k = 3001, 257, 8, 2  # several count blocks
    x = torch.randn(T, d).to(dtype)
    ids = torch.randint(0, E, (T, k))
    ids[ids == 6] = 0
    ref = moe.permute_ref(x, ids, E)
    for backend in ("cuda", "triton"):
        got = sphinx_kernels.permute(x.cuda(), ids.cuda(), E, backend=backend)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a.cpu(), b), backend
        onehot = F.one_hot(torch.zeros(T, dtype=torch.int64), k).float().cuda()
        assert torch.equal(sphinx_kernels.unpermute(got[0], got[1], onehot, backend=backend).cpu(), x)


@pytest.mark.gpu
def test_grouped_mm_triton_vs_torch_grouped_mm_gpu(seed):
    torch.use_deterministic_algorithms(False)
    x = torch.randn(1000, 256).bfloat16()
    w = torch.randn(8, 256, 384).bfloat16()
    ends = torch.tensor([0, 100, 100, 400, 401, 700, 999, 1000], dtype=torch.int32)
    y = sphinx_kernels.grouped_mm(x.cuda(), w.cuda(), ends.cuda(), backend="triton").cpu()
    peer = torch._grouped_mm(x.cuda(), w.cuda(), ends.cuda()).cpu()
    ref64 = loop_grouped_mm(x.double(), w.double(), ends.tolist())
    assert_close_to_reference(y, ref64, peer, name="triton vs _grouped_mm")


# ----------------------------------------------------------------------------------------------------
# More than one device: every launch on its inputs' device; inputs on two devices are an error.
# ----------------------------------------------------------------------------------------------------


def test_inputs_on_two_devices_are_an_error(seed):
    """A clear error naming the two tensors (the meta device stands in for a second one on the CPU)."""
    x, rw, w1, w3, w2 = make_inputs(6, 8, 10, 3, seed=seed)
    offsets = torch.tensor([2, 4, 6], dtype=torch.int32)
    ids = torch.randint(0, 3, (6, 2))
    with pytest.raises(ValueError, match="w2 is on meta but x is on cpu"):
        moe.moe_mlp(x, rw, w1, w3, w2.to("meta"), top_k=2)
    with pytest.raises(ValueError, match="weights is on meta but x is on cpu"):
        moe.moe_experts(x, ids, torch.rand(6, 2, device="meta"), w1, w3, w2)
    with pytest.raises(ValueError, match="offsets is on meta but x is on cpu"):
        sphinx_kernels.grouped_mm(x, w1, offsets.to("meta"))
    with pytest.raises(ValueError, match="expert_ids is on meta but x is on cpu"):
        sphinx_kernels.permute(x, ids.to("meta"), 3)
    with pytest.raises(ValueError, match="weights is on meta but y_sorted is on cpu"):
        sphinx_kernels.unpermute(torch.randn(12, 8), ids, torch.rand(6, 2, device="meta"))
    with pytest.raises(ValueError, match="expert_mask is on meta but router_logits is on cpu"):
        sphinx_kernels.route(torch.randn(6, 3), 2, expert_mask=torch.ones(3, dtype=torch.bool, device="meta"))


needs_two_gpus = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("backend", ["cuda", "triton", "grouped_mm"])
def test_moe_runs_on_the_inputs_gpu_not_the_current_one(backend, seed):
    """Tensors on cuda:1 while the current device is cuda:0: every kernel runs on cuda:1 (a launch on the
    current device would read cuda:1's memory from cuda:0: garbage or a fault), and the inputs' device
    is where the results are."""
    if backend == "cuda" and not _backend.extension_has_kernel("moe_permute", "CUDA"):
        pytest.skip("extension built without CUDA")
    torch.use_deterministic_algorithms(False)
    T, d, f, E, k = 77, 64, 96, 4, 2
    inputs = make_inputs(T, d, f, E, seed=seed)
    grad_out = torch.randn(T, d)
    with torch.cuda.device(0):
        leaves = [t.bfloat16().to("cuda:1").requires_grad_() for t in inputs]
        out, aux = moe.moe_mlp(*leaves, top_k=k, backend=backend)
        (out.float() * grad_out.to("cuda:1")).sum().backward()
        assert out.device == torch.device("cuda:1") and all(t.grad.device == out.device for t in leaves)
        x_sorted, row_map, offsets = sphinx_kernels.permute(
            leaves[0].detach(), aux.expert_ids, E, backend=backend
        )
        y = sphinx_kernels.grouped_mm(x_sorted, leaves[2].detach(), offsets, backend=backend)
    ids = aux.expert_ids.cpu()
    bf16 = [t.bfloat16() for t in inputs]
    ref64, _, _, grads64 = _reference(bf16, k, None, grad_out, torch.float64, ids=ids)
    ref16, _, _, grads16 = _reference(bf16, k, None, grad_out, torch.bfloat16, ids=ids)
    assert_close_to_reference(out.cpu(), ref64, ref16, name="out on cuda:1")
    for name, t, g64, g16 in zip(
        ("x", "router_weight", "w1", "w3", "w2"), leaves, grads64, grads16, strict=True
    ):
        assert_close_to_reference(t.grad.cpu(), g64, g16, name=f"grad {name} on cuda:1")
    ref_sorted = moe.permute_ref(bf16[0], ids, E)
    for got, want in zip((x_sorted, row_map, offsets), ref_sorted, strict=True):
        assert torch.equal(got.cpu(), want)
    ends = offsets.tolist()
    y64 = loop_grouped_mm(ref_sorted[0].double(), bf16[2].double(), ends)
    assert_close_to_reference(
        y.cpu(), y64, loop_grouped_mm(ref_sorted[0], bf16[2], ends), name="grouped_mm on cuda:1"
    )


@pytest.mark.gpu
@needs_two_gpus
def test_inputs_on_two_gpus_are_an_error(seed):
    x, rw, w1, w3, w2 = (t.cuda() for t in make_inputs(6, 8, 10, 3, seed=seed))
    with pytest.raises(ValueError, match="w1 is on cuda:1 but x is on cuda:0"):
        moe.moe_mlp(x, rw, w1.to("cuda:1"), w3, w2, top_k=2)
