"""The compiled Triton path (passes/lower.py): registration, numerics, which graphs get it.

On CPU: the triton_op bodies run under the Triton interpreter against a float64 reference with
NaN-poisoned outputs (deterministic mode fills fresh allocations with NaN); AOTAutograd traces the
public ops on fake CUDA tensors (no GPU needed) to show the swap to the kernel; a compiled CPU
graph keeps the opaque op. With CUDA, Inductor's generated code is checked for the kernel.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from sparselora_fx import _compat
from sparselora_fx.errors import SparseLoRAError
from sparselora_fx.counters import counters
from sparselora_fx.passes import lower as lowering
from sparselora_fx.runtime import kernels, ops

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (kernels.HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA + triton")

B, S, K, N, NK = 2, 19, 70, 53, 19  # awkward sizes: no multiple of any tile
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 * 2**-8, 1e-2)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _idx(total: int, g: torch.Generator, device: str = "cpu") -> torch.Tensor:
    return torch.randperm(total, generator=g)[:NK].to(device)  # unsorted, with gaps


def _cases(dtype: torch.dtype, device: str = "cpu") -> Iterator[tuple[str, tuple[Any, ...], torch.Tensor]]:
    """(public op name, args, float64 reference) for each of the six ops."""
    g = _gen(11)
    x, w, bias = _rand((B, S, K), dtype, g, device), _rand((N, K), dtype, g, device), _rand((N,), dtype, g, device)
    idx_o, idx_i = _idx(N, g, device), _idx(K, g, device)
    x_n, dy_n = _rand((B, S, NK), dtype, g, device), _rand((B, S, NK), dtype, g, device)
    dy = _rand((B, S, N), dtype, g, device)
    d = lambda t: t.double()  # noqa: E731
    rows = d(x) @ d(w)[idx_o].T + d(bias)[idx_o]
    scat = torch.zeros((B, S, N), dtype=torch.float64, device=device)
    scat[..., idx_o] = rows
    yield "rows_linear", (x, w, idx_o, bias), rows
    yield "rows_linear_scatter", (x, w, idx_o, bias), scat
    yield "cols_linear", (x_n, w, idx_i), d(x_n) @ d(w)[:, idx_i].T
    yield "cols_linear_gather", (x, w, idx_i), d(x)[..., idx_i] @ d(w)[:, idx_i].T
    yield "rows_linear_dx", (dy_n, w, idx_o, K), d(dy_n) @ d(w)[idx_o]
    yield "cols_linear_dx", (dy, w, idx_i), d(dy) @ d(w)[:, idx_i]


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=rtol, atol=atol)


@pytest.fixture
def nan_poisoned_allocations() -> Iterator[None]:
    """Every fresh float allocation starts as NaN, so an element the kernel never writes fails."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# --------------------------------------------------------------------------- (a) registration


@needs_triton
def test_triton_ops_registered_next_to_each_public_op() -> None:
    assert lowering.is_registered()
    assert set(lowering.TRITON_OPS) == set(ops.OPS)
    for public, triton_name in lowering.TRITON_OPS.items():
        assert hasattr(torch.ops.sparselora, public) and hasattr(torch.ops.sparselora, triton_name)
        # The public schema is unchanged; the triton_op takes the same arguments.
        pub = getattr(torch.ops.sparselora, public).default._schema
        tri = getattr(torch.ops.sparselora, triton_name).default._schema
        assert [a.type for a in pub.arguments] == [a.type for a in tri.arguments]
        assert [r.type for r in pub.returns] == [r.type for r in tri.returns]
        # Named for AOTAutograd's cache key: an edited kernel must not be served from the cache.
        for name in (public, triton_name):
            srcs = torch._library.triton.get_triton_kernels_for_op(f"sparselora::{name}")
            assert [k.fn.__name__ for k in srcs] == ["gather_mm_kernel"]


def test_package_runs_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        torch.set_num_threads(1)
        from sparselora_fx.passes import lower as lowering
        from sparselora_fx.runtime import ops
        assert not lowering.is_registered()
        assert not hasattr(torch.ops.sparselora, "rows_linear_triton")
        x, w, idx = torch.randn(2, 3, 8), torch.randn(6, 8), torch.tensor([4, 1, 3])
        f = torch.compile(lambda x: ops.rows_linear(x, w, idx).sum(), backend="aot_eager")
        x.requires_grad_(True)
        f(x).backward()
        assert torch.allclose(x.grad, w[idx].sum(0).expand(2, 3, 8))
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- (b) interpreter numerics


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_op_bodies_match_reference_under_interpreter(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch, nan_poisoned_allocations: None
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before the first launch: kernels are built lazily per mode
    for name, args, ref in _cases(dtype):
        op = getattr(torch.ops.sparselora, lowering.TRITON_OPS[name])
        out = op(*args)
        assert bool(torch.isfinite(out).all()), f"{name}: an output element was never written"
        _close(out, ref, dtype)
        if name == "rows_linear_scatter":
            dropped = torch.ones(N, dtype=torch.bool)
            dropped[args[2]] = False
            assert bool((out[..., dropped] == 0).all())


@needs_triton
@pytest.mark.parametrize("layout", ["transposed", "row_slice"])
def test_triton_op_bodies_read_strided_weights_in_place(
    layout: str, monkeypatch: pytest.MonkeyPatch, nan_poisoned_allocations: None
) -> None:
    """GPT-2 Conv1D passes `W.t()`, fused projections pass row slices: exact results; the rows side
    reads the weight in place, the columns side a compact copy of the kept columns only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dtype = torch.float32
    g = _gen(14)
    if layout == "transposed":
        w = _rand((K, N), dtype, g).t()
    else:
        w = _rand((3 * N + 5, K + 3), dtype, g)[N + 2: 2 * N + 2, 1: K + 1]
    assert w.shape == (N, K) and not w.is_contiguous()
    seen: list[torch.Tensor] = []
    launch = lowering._launch
    monkeypatch.setattr(lowering, "_launch", lambda a, b, *r, **kw: (seen.append(b), launch(a, b, *r, **kw))[1])
    names = []
    for name, args, ref in _cases(dtype):
        args = (args[0], w, *args[2:])
        ref = _reference(name, args)
        out = getattr(torch.ops.sparselora, lowering.TRITON_OPS[name])(*args)
        assert bool(torch.isfinite(out).all()), f"{name}: an output element was never written"
        _close(out, ref, dtype)
        names.append(name)
        b = seen[-1]
        if name.startswith("cols"):  # [n, out]: the kept columns, transposed, nothing else
            assert b.is_contiguous() and b.shape == (args[2].shape[0], N) and b.data_ptr() != w.data_ptr(), name
        else:
            assert b.data_ptr() == w.data_ptr() and b.stride() == w.stride(), name
    assert len(seen) == len(names) == len(lowering.TRITON_OPS)


def _reference(name: str, args: tuple[Any, ...]) -> torch.Tensor:
    """float64 result of public op `name` on `args` (the weight may be any view)."""
    d = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    x, w, idx = d[0], d[1], d[2]
    if name in ("rows_linear", "rows_linear_scatter"):
        rows = x @ w[idx].T + (d[3][idx] if d[3] is not None else 0)
        if name == "rows_linear":
            return rows
        out = torch.zeros((*x.shape[:-1], w.shape[0]), dtype=torch.float64)
        out[..., idx] = rows
        return out
    if name == "cols_linear":
        return x @ w[:, idx].T
    if name == "cols_linear_gather":
        return x[..., idx] @ w[:, idx].T
    if name == "rows_linear_dx":
        return x @ w[idx]
    return x @ w[:, idx]  # cols_linear_dx


@needs_triton
def test_triton_op_bodies_check_inputs_like_the_public_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, idx = torch.zeros(2, 8), torch.zeros(6, 7), torch.tensor([1, 2])
    with pytest.raises(SparseLoRAError, match="sparselora::rows_linear: x has last dimension 8"):
        torch.ops.sparselora.rows_linear_triton(x, w, idx, None)


# --------------------------------------------------------------------------- (c) compiled CPU graph


def test_compiled_cpu_graph_keeps_the_opaque_op() -> None:
    """On CPU nothing is swapped: the op stays one extern call; values and gradients are exact."""
    g = _gen(12)
    x = _rand((B, S, K), torch.float64, g).requires_grad_(True)  # fp64: the comparison is exact
    w, bias, idx = _rand((N, K), torch.float64, g), _rand((N,), torch.float64, g), _idx(N, g)
    graphs: list[str] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(str(gm.graph))
        return _compat.boxed(gm)

    backend = _compat.aot_autograd_backend(capture, capture)
    counters.clear()
    f = torch.compile(lambda x: ops.rows_linear_scatter(x, w, idx, bias), backend=backend, fullgraph=True)
    out = f(x)
    out.square().sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    ref = torch.zeros((B, S, N), dtype=torch.float64)
    ref[..., idx] = xd @ w[idx].T + bias[idx]
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-12, atol=1e-12)
    assert not [k for k in counters["sparselora"] if k.startswith("lowered_")]
    assert sum(lowering.LOWERED.values()) == 0  # the same counts, by op name
    assert len(graphs) == 2
    assert "sparselora.rows_linear_scatter" in graphs[0] and "sparselora.rows_linear_dx" in graphs[1]
    assert not any("triton_kernel_wrapper" in gr for gr in graphs)


# --------------------------------------------------------------------------- cache keys


def _one_op_graph(op: Any) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """A graph calling `op(x, w, idx, None)`, with example inputs (what the backend hands to lower())."""
    graph = torch.fx.Graph()
    x, w, idx = (graph.placeholder(n) for n in ("x", "w", "idx"))
    graph.output(graph.call_function(op, (x, w, idx, None)))
    g = _gen(15)
    return torch.fx.GraphModule(torch.nn.Module(), graph), [_rand((B, S, K), torch.float32, g),
                                                            _rand((N, K), torch.float32, g), _idx(N, g)]


def _inductor_key(gm: torch.fx.GraphModule, inputs: list[torch.Tensor], settings: Any,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any]]:
    """The FX graph cache key under the config patches backend.lower() hands Inductor, and the patches.

    AOTAutograd's cache key extends the same details (AOTAutogradCacheDetails(FxGraphHashDetails)),
    config and custom-pass uuids included, so what changes this key changes that one too.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import compiled_fx_graph_hash

    from sparselora_fx import backend

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(_compat, "compile_fx", lambda: lambda gm, inputs, config_patches=None: seen.append(
        config_patches or {}))
    backend.lower(gm, inputs, settings)
    with inductor_config.patch(seen[0]):
        return compiled_fx_graph_hash(gm, inputs, {}, [])[0], seen[0]


def test_cache_key_changes_with_the_lowering_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache hit skips the trace that decides the swap, so every switch it reads is in the key."""
    from sparselora_fx.settings import Settings

    for name in (kernels.DISABLE_ENV, kernels.LOWERING_ENV, "SPARSELORA_TRITON_AUTOTUNE"):
        monkeypatch.delenv(name, raising=False)
    gm, inputs = _one_op_graph(torch.ops.sparselora.rows_linear.default)
    settings = Settings.from_options({})
    base, _ = _inductor_key(gm, inputs, settings, monkeypatch)
    assert _inductor_key(gm, inputs, settings, monkeypatch)[0] == base  # same switches, same key: caching works
    keys = {}
    for name, value in ((kernels.DISABLE_ENV, "1"), (kernels.LOWERING_ENV, "0"), ("SPARSELORA_TRITON_AUTOTUNE", "0")):
        monkeypatch.setenv(name, value)
        keys[name], _ = _inductor_key(gm, inputs, settings, monkeypatch)
        monkeypatch.delenv(name)
    if kernels.HAS_TRITON:  # without triton the switches change nothing, and neither does the key
        assert len({base, *keys.values()}) == 4, keys
    # A graph without our ops gets no extra pass (its key does not depend on our switches).
    dense, dense_inputs = _one_op_graph(torch.ops.aten.addmm.default)
    assert "post_grad_custom_post_pass" not in _inductor_key(dense, dense_inputs, settings, monkeypatch)[1]


def test_cache_key_keeps_a_users_post_grad_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """options['inductor'] may set post_grad_custom_post_pass: it still runs and stays in the key."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from sparselora_fx.settings import Settings

    ran: list[str] = []

    class UserPass(CustomGraphPass):
        def __init__(self, version: str) -> None:
            self.version = version

        def __call__(self, graph: torch.fx.Graph) -> None:
            ran.append(self.version)

        def uuid(self) -> Any:
            return ("user", self.version)

    gm, inputs = _one_op_graph(torch.ops.sparselora.rows_linear.default)
    keys, passes = [], []
    for version in ("v1", "v2"):
        key, patches = _inductor_key(gm, inputs, Settings.from_options({"inductor": {
            "post_grad_custom_post_pass": UserPass(version)}}), monkeypatch)
        keys.append(key)
        passes.append(patches["post_grad_custom_post_pass"])
    assert keys[0] != keys[1]
    configured = passes[0]
    for p in (configured if isinstance(configured, list) else [configured]):  # 2.13: a list; 2.11: one chained pass
        p(gm.graph)
    assert ran == ["v1"]


# --------------------------------------------------------------------------- the swap, traced on fake CUDA


def _trace_fake_cuda(fn: Callable[..., torch.Tensor], dtype: torch.dtype,
                     monkeypatch: pytest.MonkeyPatch) -> list[torch.fx.GraphModule]:
    """AOTAutograd graphs of `fn(x, w, idx_out, idx_in)` on fake CUDA tensors (no GPU, no autograd).

    Without a GPU triton cannot build the kernel's IR, from which torch reads which arguments
    the kernel writes; the answer it gets on a GPU (only the output `c_ptr`) is patched in.
    """
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops import triton_kernel_wrap
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(triton_kernel_wrap, "get_mutated_tensors", lambda *a, **k: ["c_ptr"])
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return gm

    with FakeTensorMode():
        x = torch.empty((B, S, K), dtype=dtype, device="cuda")
        w = torch.empty((N, K), dtype=dtype, device="cuda")
        idx_o = torch.empty((NK,), dtype=torch.int64, device="cuda")
        idx_i = torch.empty((NK,), dtype=torch.int64, device="cuda")
        aot_function(fn, fw_compiler=capture)(x, w, idx_o, idx_i)
    return graphs


def _mlp_like(x: torch.Tensor, w: torch.Tensor, idx_o: torch.Tensor, idx_i: torch.Tensor) -> torch.Tensor:
    h = ops.rows_linear(x, w, idx_o, None)
    dx = ops.rows_linear_dx(h, w, idx_o, K)  # [..., K]
    return ops.cols_linear(h, w, idx_o) + ops.cols_linear_gather(dx, w, idx_i)  # [..., N]


def _kernels_in(gm: torch.fx.GraphModule) -> list[str]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names = []
    for node in gm.graph.nodes:
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            names.append(getattr(kernel, "fn", kernel).__name__)
    return names


@needs_triton
def test_cuda_graph_gets_the_kernel_in_place_of_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(kernels.LOWERING_ENV, raising=False)
    counters.clear()
    (gm,) = _trace_fake_cuda(_mlp_like, torch.bfloat16, monkeypatch)
    assert _kernels_in(gm) == ["gather_mm_kernel"] * 4
    assert "sparselora" not in str(gm.graph)
    swapped = lowering.LOWERED  # counters["sparselora"]["lowered_<op>"] by op name
    # AOTAutograd traces twice (metadata, then the graph): count what was swapped, not how often.
    assert set(swapped) == {"rows_linear", "cols_linear", "rows_linear_dx", "cols_linear_gather"}


@needs_triton
@pytest.mark.parametrize("why", ["fp64", "lowering off", "triton off"])
def test_cuda_graph_keeps_the_op_when_the_triton_path_is_off(why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(kernels.LOWERING_ENV, raising=False)
    if why == "lowering off":
        monkeypatch.setenv(kernels.LOWERING_ENV, "0")
    if why == "triton off":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    dtype = torch.float64 if why == "fp64" else torch.bfloat16
    (gm,) = _trace_fake_cuda(_mlp_like, dtype, monkeypatch)
    assert _kernels_in(gm) == []
    for name in ("rows_linear", "cols_linear", "rows_linear_dx", "cols_linear_gather"):
        assert f"sparselora.{name}.default" in str(gm.graph)


# --------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inductor_code_contains_the_kernel_forward_and_backward(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SPARSELORA_TRITON_AUTOTUNE", "0")  # one tile: bounded compile time
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(kernels.LOWERING_ENV, raising=False)
    torch._dynamo.reset()
    g = _gen(13)
    x = _rand((B, S, K), dtype, g, "cuda").requires_grad_(True)
    w, bias = _rand((N, K), dtype, g, "cuda"), _rand((N,), dtype, g, "cuda")
    idx_o, idx_i = _idx(N, g, "cuda"), _idx(K, g, "cuda")

    def f(x: torch.Tensor) -> torch.Tensor:
        h = ops.rows_linear(x, w, idx_o, bias)
        return ops.cols_linear(h, w, idx_o) + ops.cols_linear_gather(x, w, idx_i) + ops.rows_linear_scatter(x, w, idx_o)

    def step(x: torch.Tensor) -> torch.Tensor:
        out = torch.compile(f, fullgraph=True)(x)
        out.square().sum().backward()
        return out

    out, code = _compat.run_and_get_code(step, x)
    src = "\n".join(code)
    assert src.count("def gather_mm_kernel") >= 1, "Inductor did not emit the gather-GEMM kernel"
    assert "sparselora.rows_linear" not in src  # not called as an extern op
    xd = x.detach().double().requires_grad_(True)
    wd, bd = w.double(), bias.double()
    h = xd @ wd[idx_o].T + bd[idx_o]
    scat = torch.zeros((B, S, N), dtype=torch.float64, device="cuda")
    scat[..., idx_o] = xd @ wd[idx_o].T
    ref = h @ wd[:, idx_o].T + xd[..., idx_i] @ wd[:, idx_i].T + scat
    ref.square().sum().backward()
    rtol, atol = (2e-2, 5e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=rtol, atol=atol * 10)
