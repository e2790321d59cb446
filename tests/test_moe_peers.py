"""The MoE family's peer adapters against stand-ins with the peers' exact signatures and checks.

Neither peer's real kernels run here (grouped_gemm is CUDA-only; torch._grouped_mm's CUDA path checks more
than its CPU fallback), so each adapter runs against a stand-in module that has the peer's real Python
signature and argument checks (read from the peers' sources, cited per stand-in) and computes in float64:
a call with a wrong signature, dtype, layout or device of an argument fails here, in CI, instead of on the
first GPU box that has the peer installed. The backend is forced with the device check patched (the peers
run on CUDA tensors only; the stand-ins on CPU ones).
"""

import sys
import types

import pytest
import torch
from conftest import assert_close_to_reference
from test_moe import _reference, loop_grouped_mm, make_inputs

import sphinx_kernels
from sphinx_kernels import _backend, moe


def _check(ok: bool, what: str) -> None:
    if not ok:  # the peers raise from TORCH_CHECK: a RuntimeError
        raise RuntimeError(f"stand-in: {what}")


def _groups(batch_sizes: torch.Tensor) -> list[tuple[int, int]]:
    ends = batch_sizes.cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def grouped_gemm_standin() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """grouped_gemm (github.com/tgale96/grouped_gemm at ebeae0b): ``backend.gmm(a, b, batch_sizes,
    trans_a=False, trans_b=False, c=None)`` allocates c as its ``_allocate_output`` does and runs the C++
    ``GroupedGemm`` (csrc/grouped_gemm.cu), whose checks are kept: not both transposes; batch_sizes 1-D int64
    on the CPU (the cuBLAS build; only the CUTLASS build takes CUDA sizes); a, b, c bf16 and contiguous;
    b ``(E, K, N)`` (``(E, N, K)`` with trans_b) with one size per expert, or with trans_a b ``(tokens, N)``
    and c ``(E, K, N)``. ``ops.gmm(a, b, batch_sizes, trans_b=False)`` is its autograd wrapper (no trans_a).
    Only the CUDA-device checks are dropped."""
    package = types.ModuleType("grouped_gemm")
    backend = types.ModuleType("grouped_gemm.backend")
    ops = types.ModuleType("grouped_gemm.ops")

    def _allocate_output(a, b, batch_sizes, trans_a, trans_b):
        assert not (trans_a and trans_b)
        assert batch_sizes.ndim == 1, "Expected 1d tensor for batch_sizes"
        assert a.ndim == 2, "Expected 2d tensor for 'a'"
        assert b.ndim == (2 if trans_a else 3)
        shape = (
            (batch_sizes.shape[0], a.shape[1], b.shape[1])
            if trans_a
            else (a.shape[0], (b.shape[1] if trans_b else b.shape[2]))
        )
        return torch.empty(*shape, device=a.device, dtype=a.dtype)

    def _grouped_gemm(a, b, c, batch_sizes, trans_a, trans_b):
        _check(not (trans_a and trans_b), "trans_a and trans_b")
        _check(batch_sizes.device.type == "cpu", "batch_sizes must be on the CPU")
        _check(batch_sizes.ndim == 1 and batch_sizes.dtype == torch.int64, "batch_sizes must be 1-D int64")
        _check(a.ndim == 2 and a.dtype == torch.bfloat16, "a must be a 2-D bf16 tensor")
        _check(b.dtype == torch.bfloat16 and c.dtype == torch.bfloat16, "b and c must be bf16")
        if trans_a:
            _check(b.ndim == 2 and c.ndim == 3 and b.shape[0] == a.shape[0], "trans_a: b (tokens, N)")
            _check(tuple(c.shape) == (batch_sizes.shape[0], a.shape[1], b.shape[1]), "trans_a: c (E, K, N)")
        else:
            _check(b.ndim == 3 and c.ndim == 2, "b must be 3-D, c 2-D")
            _check((b.shape[2] if trans_b else b.shape[1]) == a.shape[1], "contraction dimensions differ")
            _check(batch_sizes.shape[0] == b.shape[0], "one batch size per expert")
        _check(a.is_contiguous() and b.is_contiguous() and c.is_contiguous(), "a, b, c must be contiguous")
        _check(int(batch_sizes.sum()) == a.shape[0], "batch sizes must cover a's rows")
        a64, b64 = a.double(), b.double()
        for e, (s, t) in enumerate(_groups(batch_sizes)):
            if trans_a:
                c[e] = a64[s:t].T @ b64[s:t]
            else:
                c[s:t] = a64[s:t] @ (b64[e].T if trans_b else b64[e])

    def gmm(a, b, batch_sizes, trans_a=False, trans_b=False, c=None):
        if c is None:
            c = _allocate_output(a, b, batch_sizes, trans_a, trans_b)
        _grouped_gemm(a, b, c, batch_sizes, trans_a, trans_b)
        return c

    class GroupedGemm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, batch_sizes, trans_b):
            ctx.save_for_backward(a, b, batch_sizes)
            ctx.trans_b = trans_b
            return gmm(a, b, batch_sizes, trans_a=False, trans_b=trans_b)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous()
            a, b, batch_sizes = ctx.saved_tensors
            agrad = gmm(grad, b, batch_sizes, trans_a=False, trans_b=not ctx.trans_b)
            lhs, rhs = (grad, a) if ctx.trans_b else (a, grad)
            return agrad, gmm(lhs, rhs, batch_sizes, trans_a=True, trans_b=False), None, None

    def ops_gmm(a, b, batch_sizes, trans_b=False):
        return GroupedGemm.apply(a, b, batch_sizes, trans_b)

    backend.gmm = gmm
    ops.gmm = ops_gmm
    package.backend, package.ops = backend, ops
    return package, backend, ops


def megablocks_standin(grouped_gemm: types.ModuleType) -> tuple[types.ModuleType, types.ModuleType]:
    """megablocks (github.com/databricks/megablocks at 78eea65): ``megablocks.grouped_gemm_util`` re-exports
    grouped_gemm's ``backend`` and ``ops`` and says whether grouped_gemm imported."""
    package = types.ModuleType("megablocks")
    util = types.ModuleType("megablocks.grouped_gemm_util")
    util.grouped_gemm_is_available = lambda: True
    util.backend, util.ops = grouped_gemm.backend, grouped_gemm.ops
    package.grouped_gemm_util = util
    return package, util


@pytest.fixture
def megablocks_here(monkeypatch):
    """The stand-ins importable and the megablocks backend allowed on CPU tensors."""
    package, backend, ops = grouped_gemm_standin()
    mb, util = megablocks_standin(package)
    modules = {
        "grouped_gemm": package,
        "grouped_gemm.backend": backend,
        "grouped_gemm.ops": ops,
        "megablocks": mb,
        "megablocks.grouped_gemm_util": util,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    runs_on = _backend._runs_on
    monkeypatch.setattr(
        _backend,
        "_runs_on",
        lambda name, device, op: (True, "stand-in") if name == "megablocks" else runs_on(name, device, op),
    )
    return backend


def test_megablocks_grouped_mm_forward_backward(megablocks_here, seed):
    """x @ w with w dense and as a transposed view (grouped_gemm's trans_b), an empty group, both gradients
    (dW through grouped_gemm's variable-K form, trans_a)."""
    M, K, N, ends = 37, 24, 40, [10, 10, 30, 37]
    x = torch.randn(M, K).bfloat16()
    w = torch.randn(len(ends), K, N).bfloat16()
    dy = torch.randn(M, N).bfloat16()
    offsets = torch.tensor(ends, dtype=torch.int32)

    def run(dtype, fn, transposed=False):
        xl = x.to(dtype, copy=True).requires_grad_()
        stored = (w.transpose(1, 2) if transposed else w).to(dtype, copy=True).contiguous().requires_grad_()
        y = fn(xl, stored.transpose(1, 2) if transposed else stored)
        (y * dy.to(dtype)).sum().backward()
        return y.detach(), xl.grad, stored.grad.transpose(1, 2) if transposed else stored.grad

    ref64 = run(torch.float64, lambda a, b: loop_grouped_mm(a, b, ends))
    ref16 = run(torch.bfloat16, lambda a, b: loop_grouped_mm(a, b, ends))
    for transposed in (False, True):
        got = run(
            torch.bfloat16,
            lambda a, b: sphinx_kernels.grouped_mm(a, b, offsets, backend="megablocks"),
            transposed,
        )
        for name, g, r64, r16 in zip(("y", "dx", "dw"), got, ref64, ref16, strict=True):
            assert g.dtype == torch.bfloat16
            assert_close_to_reference(g, r64, r16, name=f"{name} (transposed {transposed})")


def test_megablocks_moe_mlp(megablocks_here, seed):
    T, d, f, E, k = 29, 24, 40, 4, 2
    inputs = make_inputs(T, d, f, E, seed=seed, empty=(3,))
    grad_out = torch.randn(T, d)
    leaves = [t.bfloat16().requires_grad_() for t in inputs]
    out, aux = moe.moe_mlp(*leaves, top_k=k, backend="megablocks")
    (out.float() * grad_out).sum().backward()
    bf16 = [t.bfloat16() for t in inputs]
    ref64, _, _, grads64 = _reference(bf16, k, None, grad_out, torch.float64, ids=aux.expert_ids)
    ref16, _, _, grads16 = _reference(bf16, k, None, grad_out, torch.bfloat16, ids=aux.expert_ids)
    assert_close_to_reference(out, ref64, ref16, name="out")
    for name, t, g64, g16 in zip(
        ("x", "router_weight", "w1", "w3", "w2"), leaves, grads64, grads16, strict=True
    ):
        assert_close_to_reference(t.grad, g64, g16, name=f"grad {name}")


def test_megablocks_is_bf16_only(megablocks_here, seed):
    x, rw, w1, w3, w2 = make_inputs(6, 8, 10, 3, seed=seed)
    with pytest.raises(TypeError, match="the megablocks backend runs bfloat16, got torch.float32"):
        moe.moe_mlp(x, rw, w1, w3, w2, top_k=2, backend="megablocks")


def test_the_old_megablocks_call_fails_against_the_standin(megablocks_here):
    """What the adapter used to call (``gg.ops.gmm(..., trans_a=True)``) is not grouped_gemm's API: the
    stand-in refuses it as the real module does."""
    from megablocks import grouped_gemm_util as gg

    a, b = torch.randn(6, 4).bfloat16(), torch.randn(6, 5).bfloat16()
    with pytest.raises(TypeError, match="trans_a"):
        gg.ops.gmm(a, b, torch.tensor([2, 4]), trans_a=True)


def grouped_mm_standin(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """torch._grouped_mm (2-D x 3-D and 2-D x 2-D with offsets) with the checks of its CUDA path
    (ATen's _grouped_mm_validate_inputs and check_valid_strides_and_return_transposed): fp32/fp16/bf16
    operands of one dtype; int32 1-D offsets on their device; each operand row- or column-major with the
    other stride a multiple of 16 bytes and its data pointer 16-byte aligned (the CPU fallback checks
    neither the pointer nor, before 2.9, every stride). Computes in float64."""
    _check(mat_a.dtype in (torch.float32, torch.float16, torch.bfloat16), "mat_a dtype")
    _check(mat_b.dtype == mat_a.dtype, "mat_a and mat_b dtypes differ")
    _check(bias is None and out_dtype in (None, mat_a.dtype), "no bias, out dtype of mat_a")
    _check(offs is not None and offs.dtype == torch.int32 and offs.ndim == 1, "offsets must be 1-D int32")
    _check(offs.device == mat_a.device == mat_b.device, "one device")
    for mat in (mat_a, mat_b):
        _check(mat.data_ptr() % 16 == 0, "expected data_ptr to be aligned to 16 bytes")
        rows, cols = mat.stride(-2), mat.stride(-1)
        align = 16 // mat.element_size()
        if cols == 1 and rows >= max(1, mat.shape[-1]):
            _check(rows % align == 0, "strides should be multiple of 16 bytes")
        elif rows == 1 and cols >= max(1, mat.shape[-2]):
            _check(cols % align == 0, "strides should be multiple of 16 bytes")
        else:
            _check(False, f"invalid strides {mat.stride()} for sizes {tuple(mat.shape)}")
    ends = offs.tolist()
    groups = list(zip([0, *ends[:-1]], ends, strict=True))
    a, b = mat_a.double(), mat_b.double()
    if mat_b.ndim == 3:  # (M, K) x (E, K, N) -> (M, N), rows grouped
        _check(
            mat_a.ndim == 2 and mat_b.shape[0] == offs.shape[0] and mat_b.shape[1] == mat_a.shape[1],
            "2d x 3d",
        )
        out = torch.zeros(mat_a.shape[0], mat_b.shape[2], dtype=torch.float64)
        for e, (s, t) in enumerate(groups):
            out[s:t] = a[s:t] @ b[e]
    else:  # (K, M) x (M, N) -> (E, K, N), the reduction grouped
        _check(mat_a.ndim == 2 and mat_b.ndim == 2 and mat_a.shape[1] == mat_b.shape[0], "2d x 2d")
        out = torch.stack([a[:, s:t] @ b[s:t] for s, t in groups])
    return out.to(mat_a.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_mm_adapter_meets_the_cuda_path_checks(monkeypatch, seed, dtype):
    """The grouped_mm backend through the stand-in: odd K/N (zero-padded to 16-byte strides), transposed
    weight views, and the up half of a fused gate|up weight (a base pointer f*d elements in)."""
    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm_standin)
    T, d, f, E, k = 19, 13, 11, 4, 2
    x, _, w1, w3, w2 = (t.to(dtype) for t in make_inputs(T, d, f, E, seed=seed))
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    grad_out = torch.randn(T, d)
    fused = torch.cat([w1, w3], -1).transpose(1, 2).contiguous()  # nn.Linear's (E, 2f, d)

    def run(dt, fn):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, weights, fused, w2)]
        out = fn(leaves[0], leaves[1], leaves[2].transpose(1, 2), leaves[3])
        (out.double() * grad_out.double()).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out, grads = run(
        dtype, lambda xx, ww, w13, down: moe.moe_experts(xx, ids, ww, w13, None, down, backend="grouped_mm")
    )
    ref64, grads64 = run(
        torch.float64, lambda xx, ww, w13, down: moe.moe_experts_ref(xx, ids, ww, w13, None, down)
    )
    ref_lp, grads_lp = run(dtype, lambda xx, ww, w13, down: moe.moe_experts_ref(xx, ids, ww, w13, None, down))
    assert_close_to_reference(out, ref64, ref_lp, name="out")
    for name, g, g64, glp in zip(("x", "weights", "gate_up", "w2"), grads, grads64, grads_lp, strict=True):
        assert_close_to_reference(g, g64, glp, name=f"grad {name}")


def test_grouped_mm_adapter_realigns_an_offset_weight(monkeypatch, seed):
    """A weight view whose data starts 4 bytes into its storage (aligned sizes: nothing to pad, no copy on
    the way) and a transposed one: the adapter hands torch._grouped_mm 16-byte aligned operands."""
    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm_standin)
    M, K, N, ends = 21, 16, 8, [5, 5, 21]
    x = torch.randn(M, K)
    w = torch.randn(len(ends) * K * N + 1)[1:].view(len(ends), K, N)  # data_ptr % 16 == 4
    offsets = torch.tensor(ends, dtype=torch.int32)
    for weight in (w, w.transpose(1, 2).contiguous().transpose(1, 2)):
        y = sphinx_kernels.grouped_mm(x, weight, offsets, backend="grouped_mm")
        ref64 = loop_grouped_mm(x.double(), weight.double(), ends)
        assert_close_to_reference(y, ref64, loop_grouped_mm(x, weight, ends), name="y")
