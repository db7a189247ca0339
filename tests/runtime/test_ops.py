"""Gather-linear custom ops against a float64 eager reference.

The references are written independently of the ops: dense `F.linear` on a gathered or masked
weight, and `torch.autograd.grad` of that for the input gradients.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode

from sparselora_fx.errors import SparseLoRAError
from sparselora_fx.runtime import ops

IN, OUT, K = 16, 12, 5
LEADING = {2: (7,), 3: (2, 3)}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) of an op run in `dtype` against float64 math on the same (rounded) inputs.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (6e-2, 2e-2),
    torch.float16: (6e-3, 4e-3),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make(ndim: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> SimpleNamespace:
    """Seeded inputs: weight [OUT, IN], bias [OUT], distinct unsorted idx [K], activations."""
    g = _gen(seed)
    lead = LEADING[ndim]
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    b = torch.randn(OUT, generator=g, dtype=torch.float64)
    idx = torch.randperm(OUT, generator=g)[:K]
    # idx for column ops indexes input channels, so draw it from range(IN).
    idx_in = torch.randperm(IN, generator=g)[:K]
    x_in = torch.randn(*lead, IN, generator=g, dtype=torch.float64)
    x_k = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    g_k = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    g_out = torch.randn(*lead, OUT, generator=g, dtype=torch.float64)
    cast = {n: t.to(dtype) for n, t in dict(w=w, b=b, x_in=x_in, x_k=x_k, g_k=g_k,
                                             g_out=g_out).items()}
    return SimpleNamespace(idx=idx, idx_in=idx_in, lead=lead, **cast)


def _row_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.float64)
    m[idx] = 1.0
    return m


@dataclass(frozen=True)
class Case:
    """One op: how to build its args from `_make` data, and its float64 reference."""

    name: str
    args: Callable[[SimpleNamespace], tuple]
    ref: Callable[..., torch.Tensor]  # same args, all float64
    x_shape: Callable[[SimpleNamespace], tuple]  # what the differentiable input looks like


CASES = [
    Case("rows_linear", lambda d: (d.x_in, d.w, d.idx, d.b),
         lambda x, w, i, b: F.linear(x, w[i], b[i]), lambda d: (*d.lead, IN)),
    Case("rows_linear_scatter", lambda d: (d.x_in, d.w, d.idx, d.b),
         lambda x, w, i, b: F.linear(x, w * _row_mask(i, OUT)[:, None], b * _row_mask(i, OUT)),
         lambda d: (*d.lead, IN)),
    Case("cols_linear", lambda d: (d.x_k, d.w, d.idx_in),
         lambda x, w, i: F.linear(x, w[:, i]), lambda d: (*d.lead, K)),
    Case("cols_linear_gather", lambda d: (d.x_in, d.w, d.idx_in),
         lambda x, w, i: F.linear(x, w * _row_mask(i, IN)[None, :]), lambda d: (*d.lead, IN)),
    # The backward ops, referenced by autograd of a dense linear on the gathered weight.
    Case("rows_linear_dx", lambda d: (d.g_k, d.w, d.idx, IN),
         lambda gr, w, i, n: _vjp(lambda x: F.linear(x, w[i]), (*gr.shape[:-1], n), gr),
         lambda d: (*d.lead, K)),
    Case("cols_linear_dx", lambda d: (d.g_out, d.w, d.idx_in),
         lambda gr, w, i: _vjp(lambda x: F.linear(x, w[:, i]), (*gr.shape[:-1], K), gr),
         lambda d: (*d.lead, OUT)),
]
CASE_IDS = [c.name for c in CASES]


def _vjp(f: Callable, x_shape: tuple, grad: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(x_shape, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(f(x), x, grad, create_graph=True)  # differentiable in grad
    return dx


def _op(name: str) -> Callable:
    return getattr(ops, name)


def _f64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _with_grad(args: tuple) -> tuple:
    return (args[0].detach().clone().requires_grad_(True), *args[1:])


# --------------------------------------------------------------------------- registration


def test_ops_list_names_every_registered_op_and_public_function():
    for name in ops.OPS:
        assert hasattr(torch.ops.sparselora, name)
        assert callable(getattr(ops, name))
    assert set(ops.OPS) == {c.name for c in CASES}


def test_reimport_and_reload_are_harmless():
    again = importlib.import_module("sparselora_fx.runtime.ops")
    assert again is ops
    d = _make(2)
    before = ops.rows_linear(d.x_in, d.w, d.idx, d.b)
    importlib.reload(ops)  # would raise "registered multiple times" if it defined them again
    torch.testing.assert_close(ops.rows_linear(d.x_in, d.w, d.idx, d.b), before)


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_opcheck(case: Case, ndim: int):
    d = _make(ndim, torch.float32)
    op = getattr(torch.ops.sparselora, case.name).default
    torch.library.opcheck(op, _with_grad(case.args(d)))


@pytest.mark.parametrize("name", ["rows_linear", "rows_linear_scatter"])
def test_opcheck_rows_without_bias(name: str):
    d = _make(3, torch.float32)
    op = getattr(torch.ops.sparselora, name).default
    torch.library.opcheck(op, (d.x_in.requires_grad_(True), d.w, d.idx, None))


# --------------------------------------------------------------------------- values and grads


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_values_and_input_grad_match_float64_reference(case: Case, dtype: torch.dtype, ndim: int):
    d = _make(ndim, dtype)
    args = _with_grad(case.args(d))
    y = _op(case.name)(*args)
    assert y.dtype == dtype

    ref_args = _with_grad(_f64(args))
    y_ref = case.ref(*ref_args)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)

    upstream = torch.randn(y_ref.shape, generator=_gen(1), dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, args[0], upstream.to(dtype))
    (dx_ref,) = torch.autograd.grad(y_ref, ref_args[0], upstream)
    assert dx.dtype == dtype and dx.shape == args[0].shape
    torch.testing.assert_close(dx.double(), dx_ref, atol=atol * 4, rtol=rtol * 4)


def test_cols_linear_gather_grad_is_zero_outside_idx():
    d = _make(3)
    x = d.x_in.requires_grad_(True)
    ops.cols_linear_gather(x, d.w, d.idx_in).sum().backward()
    outside = torch.ones(IN, dtype=torch.bool)
    outside[d.idx_in] = False
    assert torch.all(x.grad[..., outside] == 0)
    assert torch.all(x.grad[..., d.idx_in] != 0)


def test_rows_linear_scatter_is_zero_outside_idx():
    d = _make(2)
    y = ops.rows_linear_scatter(d.x_in, d.w, d.idx, d.b)
    outside = torch.ones(OUT, dtype=torch.bool)
    outside[d.idx] = False
    assert torch.all(y[..., outside] == 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_and_gradgradcheck_float64(case: Case):
    d = _make(3)
    args = case.args(d)
    x = args[0].detach().clone().requires_grad_(True)
    fn = lambda x: _op(case.name)(x, *args[1:])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# --------------------------------------------------------------------------- FLOPs


def _expected_flops(case: Case, d: SimpleNamespace) -> tuple[int, int]:
    """(forward, backward) GEMM FLOPs: 2 * M * k * (the dense side)."""
    m = math.prod(d.lead)
    side = IN if case.name.startswith("rows") else OUT
    return 2 * m * K * side, 2 * m * K * side


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flop_counter_counts_the_gathered_gemm_forward_and_backward(case: Case):
    d = _make(3, torch.float32)
    args = _with_grad(case.args(d))
    with FlopCounterMode(display=False) as fwd:
        y = _op(case.name)(*args)
    with FlopCounterMode(display=False) as bwd:
        y.backward(torch.ones_like(y))
    exp_fwd, exp_bwd = _expected_flops(case, d)
    assert fwd.get_total_flops() == exp_fwd
    assert fwd.get_flop_counts()["Global"] == {getattr(torch.ops.sparselora, case.name): exp_fwd}
    # Backward is exactly one dx op: the gather/scatter glue costs no FLOPs, no inner mm leaks.
    assert bwd.get_total_flops() == exp_bwd


def test_flop_formula_agrees_with_torch_linear_when_nothing_is_dropped():
    d = _make(3, torch.float32)
    all_rows = torch.arange(OUT)
    with FlopCounterMode(display=False) as ours:
        ops.rows_linear(d.x_in, d.w, all_rows, d.b)
    with FlopCounterMode(display=False) as dense:
        F.linear(d.x_in, d.w, d.b)
    assert ours.get_total_flops() == dense.get_total_flops() > 0


def test_flop_counter_through_compiled_graph():
    torch._dynamo.reset()
    d = _make(3, torch.float32)

    def mlp(x, w_up, w_down, idx):
        return ops.cols_linear(F.silu(ops.rows_linear(x, w_up, idx)), w_down, idx)

    w_down = torch.randn(IN, OUT, generator=_gen(4))
    x = d.x_in.requires_grad_(True)
    compiled = torch.compile(mlp, backend="aot_eager")
    compiled(x, d.w, w_down, d.idx)  # compile outside the counter
    with FlopCounterMode(display=False) as counter:
        compiled(x, d.w, w_down, d.idx).sum().backward()
    m = math.prod(d.lead)
    # up: K of the 12 rows of [12, 16]; down: K of the 12 input channels of [16, 12]; each
    # costs 2*M*K*16 forward and the same again for its dx op in backward.
    expected = 4 * (2 * m * K * IN)
    assert counter.get_total_flops() == expected


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_forward_backward_matches_eager(case: Case):
    torch._dynamo.reset()
    d = _make(3, torch.float32)
    args = case.args(d)
    upstream = torch.randn(case.ref(*_f64(args)).shape, generator=_gen(2))

    def step(x, *rest):
        y = _op(case.name)(x, *rest)
        return (y * upstream).sum(), y

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        x = args[0].detach().clone().requires_grad_(True)
        loss, y = fn(x, *args[1:])
        loss.backward()
        results.append((y.detach(), x.grad))
    torch.testing.assert_close(results[1], results[0])


def test_dynamic_shapes_compile_once_for_two_leading_sizes():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    w_up = torch.randn(OUT, IN, generator=_gen(5))
    w_down = torch.randn(IN, OUT, generator=_gen(6))
    w_o = torch.randn(IN, IN, generator=_gen(7))
    idx = torch.randperm(OUT, generator=_gen(8))[:K]
    idx_o = torch.randperm(IN, generator=_gen(9))[:K]

    def block(x):
        h = ops.cols_linear(F.silu(ops.rows_linear(x, w_up, idx)), w_down, idx)
        q = ops.rows_linear_scatter(x, w_up, idx)[..., :1]
        return ops.cols_linear_gather(h, w_o, idx_o) + q

    compiled = torch.compile(block, backend=counter, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in (3, 5):
            x = torch.randn(2, tokens, IN, generator=_gen(tokens)).requires_grad_(True)
            x_ref = x.detach().clone().requires_grad_(True)
            y = compiled(x)
            y.sum().backward()
            y_ref = block(x_ref)
            y_ref.sum().backward()
            torch.testing.assert_close(y, y_ref)
            torch.testing.assert_close(x.grad, x_ref.grad)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_backward_saves_weight_and_idx_never_a_gathered_copy(case: Case, compiled: bool):
    torch._dynamo.reset()
    d = _make(3, torch.float32)
    args = _with_grad(case.args(d))
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    fn = _op(case.name)
    if compiled:
        fn = torch.compile(fn, backend="aot_eager")
    with saved_tensors_hooks(pack, lambda t: t):
        y = fn(*args)
    y.sum().backward()
    in_f = d.w.shape[1]
    gathered = {(K, in_f), (d.w.shape[0], K)}
    assert saved, "nothing saved: the hook did not see the op's autograd node"
    assert not [tuple(t.shape) for t in saved if tuple(t.shape) in gathered]
    assert {tuple(t.shape) for t in saved} <= {tuple(d.w.shape), (K,)}
    assert any(t.data_ptr() == d.w.data_ptr() for t in saved)  # the weight itself, no copy


# --------------------------------------------------------------------------- dispatch


class _FakeKernels:
    """Stands in for kernels.gather_gemm: torch math plus a record of what was called."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def rows_gemm(self, x2d, w, idx, bias=None, scatter=False):
        self.calls.append(("rows_gemm", x2d.dim(), scatter))
        y = F.linear(x2d, w[idx], None if bias is None else bias[idx])
        if not scatter:
            return y
        full = x2d.new_zeros(x2d.shape[0], w.shape[0])
        full[:, idx] = y
        return full

    def cols_gemm(self, x2d, w, idx):
        self.calls.append(("cols_gemm", x2d.dim(), x2d.shape[1]))
        return x2d @ w[:, idx].t()

    def rows_gemm_dx(self, dy2d, w, idx):
        self.calls.append(("rows_gemm_dx", dy2d.dim()))
        return dy2d @ w[idx]

    def cols_gemm_dx(self, dy2d, w, idx):
        self.calls.append(("cols_gemm_dx", dy2d.dim()))
        return dy2d @ w[:, idx]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_branch_is_wired_like_the_torch_path(case: Case, monkeypatch):
    d = _make(3, torch.float32)
    args = _with_grad(case.args(d))
    y_torch = _op(case.name)(*args)
    (dx_torch,) = torch.autograd.grad(y_torch.sum(), args[0])

    fake = _FakeKernels()
    monkeypatch.setattr(ops, "_kernels_for", lambda device, dtype: fake)
    args = _with_grad(args)
    y = _op(case.name)(*args)
    (dx,) = torch.autograd.grad(y.sum(), args[0])
    torch.testing.assert_close(y, y_torch)
    torch.testing.assert_close(dx, dx_torch)
    assert fake.calls and all(c[1] == 2 for c in fake.calls)  # kernels always get 2-D input


def test_dispatch_uses_kernels_only_on_enabled_cuda_with_training_dtypes(monkeypatch):
    module = object()
    enabled = {"value": True}
    package = SimpleNamespace(HAS_TRITON=True, kernels_enabled=lambda device: enabled["value"])
    monkeypatch.setattr(ops, "_kernel_modules", lambda: (package, module))
    cuda = torch.device("cuda", 0)
    assert ops._kernels_for(cuda, torch.bfloat16) is module
    assert ops._kernels_for(cuda, torch.float16) is module
    assert ops._kernels_for(cuda, torch.float32) is module
    assert ops._kernels_for(cuda, torch.float64) is None
    assert ops._kernels_for(torch.device("cpu"), torch.float32) is None
    enabled["value"] = False
    assert ops._kernels_for(cuda, torch.float32) is None
    monkeypatch.setattr(ops, "_kernel_modules", lambda: None)
    enabled["value"] = True
    assert ops._kernels_for(cuda, torch.float32) is None


def test_cpu_tensors_never_reach_the_kernels():
    # Whatever the kernels package says, CPU work stays on the torch path.
    assert ops._kernels_for(torch.device("cpu"), torch.float32) is None


# --------------------------------------------------------------------------- errors


def _trainable(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


# (id, call on `_make(3, float32)` data, expected message)
BAD_CALLS = [
    ("dtype", lambda d: ops.rows_linear(d.x_in.double(), d.w, d.idx),
     r"rows_linear: x is torch.float64 but weight is torch.float32"),
    ("empty_idx", lambda d: ops.cols_linear_gather(d.x_in, d.w, d.idx[:0]),
     r"cols_linear_gather: idx is empty"),
    ("idx_dtype", lambda d: ops.rows_linear(d.x_in, d.w, d.idx.int()),
     r"rows_linear: idx has dtype torch.int32, expected torch.int64"),
    ("idx_2d", lambda d: ops.cols_linear(d.x_k, d.w, d.idx_in[None]),
     r"cols_linear: idx must be 1-D"),
    ("idx_device", lambda d: ops.rows_linear_scatter(d.x_in, d.w, d.idx.to("meta")),
     r"rows_linear_scatter: idx is on meta but weight is on cpu"),
    ("x_device", lambda d: ops.cols_linear_dx(d.g_out.to("meta"), d.w, d.idx_in),
     r"cols_linear_dx: grad is on meta but weight is on cpu"),
    ("x_width", lambda d: ops.rows_linear(d.x_k, d.w, d.idx),
     r"rows_linear: x has last dimension 5 but weight's in_features is 16"),
    ("cols_width", lambda d: ops.cols_linear(d.x_in, d.w, d.idx_in),
     r"cols_linear: x has last dimension 16 but the number of kept channels"),
    ("weight_1d", lambda d: ops.cols_linear(d.x_k, d.w[0], d.idx_in),
     r"cols_linear: weight must be 2-D"),
    ("bias_shape", lambda d: ops.rows_linear(d.x_in, d.w, d.idx, d.b[:K]),
     r"rows_linear: bias has shape \(5,\), expected \[12\]"),
    ("in_features", lambda d: ops.rows_linear_dx(d.g_k, d.w, d.idx, IN + 1),
     r"rows_linear_dx: in_features is 17 but weight has 16"),
    ("trainable_weight",
     lambda d: ops.rows_linear(_trainable(d.x_in), _trainable(d.w), d.idx),
     r"rows_linear: weight requires grad.*frozen.*never rewrites"),
    ("trainable_bias",
     lambda d: ops.rows_linear_scatter(_trainable(d.x_in), d.w, d.idx, _trainable(d.b)),
     r"rows_linear_scatter: bias requires grad"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_clear_errors(call: Callable, message: str):
    d = _make(3, torch.float32)
    with pytest.raises(SparseLoRAError, match=message):
        call(d)


def test_trainable_weight_without_grad_mode_is_allowed():
    # No gradient is asked for, so nothing is silently dropped.
    d = _make(2)
    with torch.no_grad():
        y = ops.rows_linear(d.x_in, d.w.clone().requires_grad_(True), d.idx)
    torch.testing.assert_close(y, F.linear(d.x_in, d.w[d.idx]))


def test_bad_call_fails_at_compile_time_with_the_same_error():
    torch._dynamo.reset()
    d = _make(2, torch.float32)
    compiled = torch.compile(lambda x: ops.rows_linear(x, d.w, d.idx), backend="aot_eager")
    with pytest.raises(Exception) as info:
        compiled(d.x_in.double())
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    ours = [e for e in chain if isinstance(e, SparseLoRAError)]
    assert ours and "x is torch.float64 but weight is torch.float32" in str(ours[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_real_triton_kernels_in_the_interpreter_match_the_torch_path(case: Case, monkeypatch):
    """The CUDA branch with the real gather-GEMM kernels, run on CPU by Triton's interpreter."""
    pytest.importorskip("triton")
    try:
        from sparselora_fx.runtime.kernels import HAS_TRITON, gather_gemm
    except ImportError as exc:  # the kernels package is optional
        pytest.skip(f"kernels not importable: {exc}")
    if not HAS_TRITON:
        pytest.skip("triton not usable")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPARSELORA_TRITON_AUTOTUNE", "0")
    d = _make(3, torch.float32)
    args = _with_grad(case.args(d))
    y_torch = _op(case.name)(*args)
    (dx_torch,) = torch.autograd.grad(y_torch.sum(), args[0])

    monkeypatch.setattr(ops, "_kernels_for", lambda device, dtype: gather_gemm)
    args = _with_grad(args)
    y = _op(case.name)(*args)
    (dx,) = torch.autograd.grad(y.sum(), args[0])
    torch.testing.assert_close(y, y_torch)
    torch.testing.assert_close(dx, dx_torch)
