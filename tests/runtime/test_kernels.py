"""Gather-GEMM kernels against a float64 torch reference.

On CPU the kernels run under the Triton interpreter. triton (3.6 to 3.9) reads
TRITON_INTERPRET through `triton.knobs.runtime.interpret` each time it is
asked, and `triton.jit` asks once, when it decorates a kernel; our kernels are
decorated lazily, on first call, once per mode. So setting the variable per
test (monkeypatch) before the first call is enough, and it does not leak into
other tests of the session (an interpreter switched on process-wide would also
catch Inductor's own Triton kernels on a GPU machine). With CUDA available the
same tests also run the compiled kernels, with autotuning off to bound compiles.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sparselora_fx.errors import SparseLoRAError
from sparselora_fx.runtime import kernels
from sparselora_fx.runtime.kernels import (
    KernelInputError,
    KernelUnavailableError,
    cols_gemm,
    cols_gemm_dx,
    configs,
    kernels_enabled,
    rows_gemm,
    rows_gemm_dx,
    transpose_weight,
    transposed_weight_bytes,
)

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

# Awkward sizes: none is a multiple of any block size; n < blocks along P or R.
M, K, N, NK = 37, 70, 53, 19

# (rtol, atol) against float64. fp32: IEEE products, fp32 sums. fp16/bf16: exact
# products, fp32 sums, one final rounding (the interpreter truncates to bf16, so
# allow two units in the last place).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2 * 2**-11, 1e-3),
    torch.bfloat16: (2 * 2**-8, 1e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setenv("SPARSELORA_TRITON_AUTOTUNE", "0")
    return torch.device(request.param)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _idx(total: int, keep: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Unsorted indices with gaps (a random subset in random order)."""
    idx = torch.randperm(total, generator=g)[:keep]
    assert not bool((idx[1:] > idx[:-1]).all()), "test index happens to be sorted; change the seed"
    return idx.to(device)


def _poisoned(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_rows_gemm(device: torch.device, dtype: torch.dtype, with_bias: bool) -> None:
    g = _gen(1)
    x, w = _rand((M, K), dtype, device, g), _rand((N, K), dtype, device, g)
    bias = _rand((N,), dtype, device, g) if with_bias else None
    idx = _idx(N, NK, g, device)
    ref = x.double() @ w.double()[idx].T
    if bias is not None:
        ref = ref + bias.double()[idx]
    out = _poisoned((M, NK), dtype, device)
    res = rows_gemm(x, w, idx, bias, out=out)
    assert res.data_ptr() == out.data_ptr()
    _close(res, ref, dtype)
    _close(rows_gemm(x, w, idx, bias), ref, dtype)  # fresh output buffer


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_gemm_scatter_writes_zeros(device: torch.device, dtype: torch.dtype) -> None:
    g = _gen(2)
    x, w, bias = _rand((M, K), dtype, device, g), _rand((N, K), dtype, device, g), _rand((N,), dtype, device, g)
    idx = _idx(N, NK, g, device)
    ref = torch.zeros((M, N), dtype=torch.float64, device=device)
    ref[:, idx] = x.double() @ w.double()[idx].T + bias.double()[idx]
    out = _poisoned((M, N), dtype, device)
    res = rows_gemm(x, w, idx, bias, scatter=True, out=out)
    assert res.data_ptr() == out.data_ptr()
    dropped = torch.ones(N, dtype=torch.bool, device=device)
    dropped[idx] = False
    assert bool((res[:, dropped] == 0).all()), "columns outside idx must be written as zeros"
    _close(res, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_cols_gemm(device: torch.device, dtype: torch.dtype, transposed: bool) -> None:
    g = _gen(3)
    w, bias = _rand((N, K), dtype, device, g), _rand((N,), dtype, device, g)
    idx = _idx(K, NK, g, device)
    xs = _rand((M, NK), dtype, device, g)
    w_t = transpose_weight(w) if transposed else None
    ref = xs.double() @ w.double()[:, idx].T
    out = _poisoned((M, N), dtype, device)
    _close(cols_gemm(xs, w, idx, w_t=w_t, out=out), ref, dtype)
    _close(cols_gemm(xs, w, idx, bias=bias, w_t=w_t), ref + bias.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_gemm_dx(device: torch.device, dtype: torch.dtype) -> None:
    g = _gen(4)
    w = _rand((N, K), dtype, device, g)
    idx = _idx(N, NK, g, device)
    dy = _rand((M, NK), dtype, device, g)
    out = _poisoned((M, K), dtype, device)
    _close(rows_gemm_dx(dy, w, idx, out=out), dy.double() @ w.double()[idx], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_cols_gemm_dx(device: torch.device, dtype: torch.dtype, transposed: bool) -> None:
    g = _gen(5)
    w = _rand((N, K), dtype, device, g)
    idx = _idx(K, NK, g, device)
    dy = _rand((M, N), dtype, device, g)
    w_t = transpose_weight(w) if transposed else None
    out = _poisoned((M, NK), dtype, device)
    _close(cols_gemm_dx(dy, w, idx, w_t=w_t, out=out), dy.double() @ w.double()[:, idx], dtype)


def test_rows_dx_matches_autograd_of_sliced_forward(device: torch.device) -> None:
    """rows_gemm_dx / cols_gemm_dx are the exact input gradients of the sparse forwards."""
    g = _gen(6)
    x = _rand((M, K), torch.float32, device, g).requires_grad_(True)
    w = _rand((N, K), torch.float32, device, g)
    idx_o, idx_i = _idx(N, NK, g, device), _idx(K, NK, g, device)
    dy_rows, dy_cols = _rand((M, NK), torch.float32, device, g), _rand((M, N), torch.float32, device, g)
    (gx_rows,) = torch.autograd.grad((x @ w[idx_o].T * dy_rows).sum(), x)
    xs = x[:, idx_i]
    (gx_cols,) = torch.autograd.grad((xs @ w[:, idx_i].T * dy_cols).sum(), x)
    _close(rows_gemm_dx(dy_rows, w, idx_o), gx_rows.double(), torch.float32)
    _close(cols_gemm_dx(dy_cols, w, idx_i), gx_cols[:, idx_i].double(), torch.float32)


def test_non_contiguous_inputs_and_int32_index(device: torch.device) -> None:
    g = _gen(7)
    x = _rand((K, M), torch.float32, device, g).T  # a transposed view
    w = _rand((K, N), torch.float32, device, g).T
    idx = _idx(N, NK, g, device)
    ref = x.double() @ w.double()[idx].T
    _close(rows_gemm(x, w, idx.to(torch.int32)), ref, torch.float32)


def _strided_weight(layout: str, dtype: torch.dtype, device: torch.device, g: torch.Generator) -> torch.Tensor:
    """An [N, K] weight view that is not contiguous: GPT-2 Conv1D's `W.t()`, or rows of a fused projection."""
    if layout == "transposed":
        return _rand((K, N), dtype, device, g).t()
    fused = _rand((3 * N + 5, K + 3), dtype, device, g)  # wider rows too: the row stride is not K
    return fused[N + 2: 2 * N + 2, 1: K + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "row_slice"])
def test_strided_weight_views_are_read_in_place(device: torch.device, dtype: torch.dtype, layout: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """All four kernels on a non-contiguous weight view: exact results, and the kernel reads the view itself."""
    from sparselora_fx.runtime.kernels import gather_gemm

    g = _gen(14)
    w = _strided_weight(layout, dtype, device, g)
    assert not w.is_contiguous()
    x, bias = _rand((M, K), dtype, device, g), _rand((N,), dtype, device, g)
    idx_o, idx_i = _idx(N, NK, g, device), _idx(K, NK, g, device)
    xs, dy_n, dy = _rand((M, NK), dtype, device, g), _rand((M, NK), dtype, device, g), _rand((M, N), dtype, device, g)
    wd = w.double()
    seen: list[torch.Tensor] = []
    launch = gather_gemm._launch
    monkeypatch.setattr(gather_gemm, "_launch", lambda a, b, *r, **kw: (seen.append(b), launch(a, b, *r, **kw))[1])
    cases = [
        (rows_gemm, (x, w, idx_o, bias), (M, NK), x.double() @ wd[idx_o].T + bias.double()[idx_o]),
        (cols_gemm, (xs, w, idx_i), (M, N), xs.double() @ wd[:, idx_i].T),
        (rows_gemm_dx, (dy_n, w, idx_o), (M, K), dy_n.double() @ wd[idx_o]),
        (cols_gemm_dx, (dy, w, idx_i), (M, NK), dy.double() @ wd[:, idx_i]),
    ]
    for fn, args, shape, ref in cases:
        out = _poisoned(shape, dtype, device)
        _close(fn(*args, out=out), ref, dtype)
    # No per-call copy of the weight: every launch got the view (its storage, offset and strides).
    assert len(seen) == 4
    assert all(b.data_ptr() == w.data_ptr() and b.stride() == w.stride() for b in seen)


def test_empty_selections(device: torch.device) -> None:
    g = _gen(8)
    x, w, bias = (_rand((M, K), torch.float32, device, g), _rand((N, K), torch.float32, device, g),
                  _rand((N,), torch.float32, device, g))  # fmt: skip
    none = torch.zeros(0, dtype=torch.int64, device=device)
    assert bool((rows_gemm(x, w, none, bias, scatter=True, out=_poisoned((M, N), torch.float32, device)) == 0).all())
    assert rows_gemm(x, w, none).shape == (M, 0)
    cols = cols_gemm(x[:, :0], w, none, bias=bias, out=_poisoned((M, N), torch.float32, device))
    _close(cols, bias.double().expand(M, N), torch.float32)
    assert bool((rows_gemm_dx(x[:, :0], w, none, out=_poisoned((M, K), torch.float32, device)) == 0).all())
    assert rows_gemm(x[:0], w, _idx(N, NK, g, device)).shape == (0, NK)


def test_input_errors(device: torch.device) -> None:
    g = _gen(9)
    x, w = _rand((M, K), torch.float32, device, g), _rand((N, K), torch.float32, device, g)
    idx = _idx(N, NK, g, device)
    with pytest.raises(KernelInputError, match=r"x2d.shape\[1\]"):
        rows_gemm(x[:, 1:], w, idx)
    with pytest.raises(KernelInputError, match="dtype"):
        rows_gemm(x, w.double(), idx)
    with pytest.raises(KernelInputError, match="int64"):
        rows_gemm(x, w, idx.float())
    with pytest.raises(KernelInputError, match="2-D"):
        rows_gemm(x[None], w, idx)
    with pytest.raises(KernelInputError, match="`out`"):
        rows_gemm(x, w, idx, scatter=True, out=torch.empty((M, NK), device=device))
    with pytest.raises(KernelInputError, match=r"\[0, 53\)"):
        rows_gemm(x, w, idx + N, check_index=True)
    with pytest.raises(KernelInputError, match="idx.numel"):
        cols_gemm(x, w, idx)
    with pytest.raises(KernelInputError, match="transpose_weight"):
        cols_gemm(x[:, :NK], w, idx % K, w_t=w)
    with pytest.raises(SparseLoRAError):  # the whole family is catchable
        cols_gemm_dx(x, w, idx)


@needs_triton
def test_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.zeros(4, 8), torch.zeros(6, 8)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        rows_gemm(x, w, torch.tensor([0, 2]))


def test_kernels_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSELORA_DISABLE_TRITON", raising=False)
    assert kernels_enabled(torch.device("cpu")) is False
    assert kernels_enabled(torch.device("cuda")) is kernels.HAS_TRITON
    monkeypatch.setenv("SPARSELORA_DISABLE_TRITON", "1")
    assert kernels_enabled(torch.device("cuda")) is False


def test_lowering_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(kernels.LOWERING_ENV, raising=False)
    assert kernels.lowering_enabled(torch.device("cpu")) is False
    assert kernels.lowering_enabled(torch.device("cuda")) is kernels.HAS_TRITON
    monkeypatch.setenv(kernels.LOWERING_ENV, "0")  # kernels stay on, as extern ops
    assert kernels.lowering_enabled(torch.device("cuda")) is False
    assert kernels.kernels_enabled(torch.device("cuda")) is kernels.HAS_TRITON
    monkeypatch.setenv(kernels.LOWERING_ENV, "1")
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")  # no kernels at all: nothing to lower
    assert kernels.lowering_enabled(torch.device("cuda")) is False


@needs_triton
def test_traceable_kernel_is_what_inductor_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs and key only (no pruning hook, no custom timing); tiles that overflow shared memory dropped."""
    from sparselora_fx.runtime.kernels import gather_gemm

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # builds the compiled-mode object; nothing is compiled here
    monkeypatch.delenv("SPARSELORA_TRITON_AUTOTUNE", raising=False)
    for dtype, elem in ((torch.float32, 4), (torch.bfloat16, 2)):
        kernel = gather_gemm.traceable_kernel(dtype)
        assert kernel is gather_gemm.traceable_kernel(dtype)  # built once per mode
        assert kernel.early_config_prune is None and kernel.perf_model is None
        assert len(kernel.configs) == len(configs.fitting(list(configs.HOPPER_CONFIGS), elem))
    assert len(gather_gemm.traceable_kernel(torch.float32).configs) < len(configs.HOPPER_CONFIGS)
    monkeypatch.setenv("SPARSELORA_TRITON_AUTOTUNE", "0")
    assert len(gather_gemm.traceable_kernel(torch.float32).configs) == 1


def test_transposed_weight_helpers() -> None:
    w = torch.randn(5, 3, generator=_gen(10)).to(torch.bfloat16)
    w_t = transpose_weight(w)
    assert w_t.is_contiguous() and torch.equal(w_t, w.T)
    assert transposed_weight_bytes(w) == w_t.untyped_storage().nbytes() == 5 * 3 * 2


def test_config_pruning_respects_shared_memory() -> None:
    for elem_bytes in (2, 4):
        kept = configs.prune(list(configs.HOPPER_CONFIGS), m=4096, elem_bytes=elem_bytes)
        assert kept and all(c.smem_bytes(elem_bytes) <= configs.SMEM_BUDGET_BYTES for c in kept)
    assert len(configs.prune(list(configs.HOPPER_CONFIGS), m=4096, elem_bytes=4)) < len(configs.HOPPER_CONFIGS)
    assert all(c.block_m <= 64 for c in configs.prune(list(configs.HOPPER_CONFIGS), m=16, elem_bytes=2))


def test_import_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from sparselora_fx.runtime import kernels
        assert kernels.HAS_TRITON is False
        assert kernels.kernels_enabled(torch.device("cuda")) is False
        assert kernels.lowering_enabled(torch.device("cuda")) is False
        try:
            kernels.rows_gemm(torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([1]))
        except kernels.KernelUnavailableError as e:
            assert "triton is not installed" in str(e)
        else:
            raise AssertionError("expected KernelUnavailableError")
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
