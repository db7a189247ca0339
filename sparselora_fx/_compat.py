"""The one place that touches private torch APIs.

Checked on torch 2.11 (source) and 2.13 (run). Each helper degrades to a safe answer when the
private name moves, so a torch upgrade costs a fallback (a warning, dense path), not a crash.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger("sparselora_fx")


#: The builtin Dynamo records for ``F.pad`` (F.pad is a Python wrapper around it).
PAD_BUILTINS: tuple[Any, ...] = tuple(f for f in (getattr(getattr(torch._C, "_nn", None), "pad", None),) if f)


def dynamo_source_name(node: torch.fx.Node) -> str | None:
    """The Dynamo source string of a placeholder (e.g. ``L['self']._modules['fc']._parameters['weight']``).

    ``node._dynamo_source`` is set by Dynamo's output graph on placeholders (2.11-2.13); ``Source.name``
    is a method in older releases and a cached property in newer ones.
    """
    src = getattr(node, "_dynamo_source", None)
    if src is None:
        return None
    name = getattr(src, "name", None)
    if callable(name):
        try:
            name = name()
        except Exception:  # pragma: no cover - defensive across versions
            return None
    return name if isinstance(name, str) else None


def backend_registry() -> tuple[dict[str, Any], dict[str, Callable[..., Any]]]:
    """Dynamo's backend tables (``_BACKENDS`` entry points, ``_COMPILER_FNS`` registered functions)."""
    from torch._dynamo.backends import registry

    registry._lazy_import()
    return registry._BACKENDS, registry._COMPILER_FNS


def lookup_backend(name: str) -> Callable[..., Any]:
    """A Dynamo backend by name (``aot_eager``, ...)."""
    from torch._dynamo.backends.registry import lookup_backend as _lookup

    return _lookup(name)


def register_backend(fn: Callable[..., Any], name: str) -> None:
    from torch._dynamo import register_backend as _register

    _register(compiler_fn=fn, name=name)


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """Inductor config patches that ``torch.compile(mode=...)`` stands for."""
    return dict(torch._inductor.list_mode_options(mode))


def aot_autograd_backend(fw_compiler: Callable[..., Any], bw_compiler: Callable[..., Any]) -> Callable[..., Any]:
    """AOTAutograd with our forward/backward graph compilers (the aot_eager shape)."""
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler)


def boxed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """AOTAutograd's boxed calling convention (one list argument) for a plain function."""
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(fn)


def compile_fx() -> Callable[..., Any]:
    """Inductor's graph compiler (a public-by-use entry: ``torch._inductor.compile_fx.compile_fx``)."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx


def trace_artifact(name: str, payload: Callable[[], str]) -> None:
    """Emit a ``TORCH_TRACE`` artifact (for tlparse) when structured tracing is on."""
    try:
        from torch._logging import trace_structured
    except ImportError:  # pragma: no cover
        return
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"sparselora_{name}", "encoding": "string"},
        payload_fn=payload,
    )


# --------------------------------------------------------------------------- compiled Triton path
# Used by passes/lower.py. Checked on torch 2.11 (source) and 2.13 (run): FunctionalTensorMode
# is the mode AOTAutograd traces under (the one torch.library.triton_op registers its decomposition
# for); `custom_triton_ops_decomposition_disabled` is what torch.export sets to keep triton_ops whole;
# `triton_ops_to_kernels` is the table AOTAutograd's cache key reads kernel sources from.


def functional_tensor_mode() -> type | None:
    """The mode class AOTAutograd functionalises under; None when it moved (the ops then stay opaque)."""
    try:
        from torch._subclasses.functional_tensor import FunctionalTensorMode
    except ImportError:  # pragma: no cover - a torch that moved it
        return None
    return FunctionalTensorMode


def plain_tensor_types(types: Any) -> bool:
    """Whether a torch_dispatch call sees only plain, fake or functional tensors (no user subclass)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return all(issubclass(t, FakeTensor) or t in (torch.Tensor, FunctionalTensor) for t in types)


def triton_decomposition_disabled() -> bool:
    """True while torch.export traces (it keeps triton_ops whole); False where the flag is absent."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # pragma: no cover
        return False
    return bool(custom_triton_ops_decomposition_disabled())


def note_triton_kernels(op_name: str, kernels: list[Any]) -> None:
    """Name the Triton kernels behind ``op_name`` ("ns::op") for AOTAutograd's cache key.

    ``torch.library.triton_op`` fills this table by reading its function's source, which cannot
    see kernels built lazily; without an entry an edited kernel could be served from the cache.
    """
    try:
        from torch._library import triton as library_triton
    except ImportError:  # pragma: no cover
        return
    table = getattr(library_triton, "triton_ops_to_kernels", None)
    if isinstance(table, dict):
        table[op_name] = list(kernels)


def run_and_get_code(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """Run ``fn`` and return (result, the source of every module Inductor generated meanwhile)."""
    from torch._inductor.utils import run_and_get_code as _run_and_get_code

    return _run_and_get_code(fn, *args, **kwargs)


# --------------------------------------------------------------------------- compiled-graph cache keys
# Used by backend.lower(). Checked on torch 2.11 (source) and 2.13 (run): FxGraphHashDetails (which
# AOTAutogradCacheDetails extends, so both the AOTAutograd and the FX graph cache key read it) puts
# the uuid() of `post_grad_custom_post_pass` into the key. 2.11 takes one pass there; 2.13 also takes
# a list (`custom_graph_pass.get_custom_graph_passes`). A pass that is not a CustomGraphPass, or whose
# uuid() is None, makes Inductor bypass its cache, which stays correct.


def keyed_inductor_patches(patches: dict[str, Any], salt: str) -> dict[str, Any]:
    """``patches`` plus a no-op post-grad pass whose uuid() is ``salt``, so ``salt`` is part of the cache keys.

    Why: state outside the graph that changes what AOTAutograd traces (here: the Triton lowering
    switches) must change the key, or a cached compile made under other switches is served. A pass
    already configured (in ``patches`` or globally) still runs, before ours, and keeps its uuid in the key.
    """
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import custom_graph_pass as cgp
    except ImportError:  # pragma: no cover - moved: no key; callers should then not rely on the cache
        return patches
    salt_pass = _salt_pass_class(cgp.CustomGraphPass)(salt)
    current = patches.get("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass)
    if current is None or (isinstance(current, (list, tuple)) and not current):
        keyed: Any = salt_pass
    elif hasattr(cgp, "get_custom_graph_passes"):  # 2.13: a list of passes
        keyed = [*cgp.get_custom_graph_passes(current), salt_pass]
    else:  # 2.11: one pass; chain the existing one in front of ours
        keyed = _chained_pass_class(cgp.CustomGraphPass)(current, salt_pass)
    return {**patches, "post_grad_custom_post_pass": keyed}


_PASS_CLASSES: dict[str, type] = {}


def _salt_pass_class(base: type) -> type:
    if "salt" not in _PASS_CLASSES:

        class SaltPass(base):  # type: ignore[misc, valid-type]
            """Changes nothing; only its uuid() matters (the cache key)."""

            def __init__(self, salt: str) -> None:
                self.salt = salt

            def __call__(self, graph: torch.fx.Graph) -> None:
                return None

            def uuid(self) -> Any:
                return ("sparselora_fx", self.salt)

        _PASS_CLASSES["salt"] = SaltPass
    return _PASS_CLASSES["salt"]


def _chained_pass_class(base: type) -> type:
    if "chain" not in _PASS_CLASSES:

        class ChainedPass(base):  # type: ignore[misc, valid-type]
            """Runs a configured pass, then ours; keyed by both (None, i.e. no caching, if the first has no uuid)."""

            def __init__(self, first: Any, salt_pass: Any) -> None:
                self.first, self.salt_pass = first, salt_pass

            def __call__(self, graph: torch.fx.Graph) -> None:
                self.first(graph)
                self.salt_pass(graph)

            def uuid(self) -> Any:
                first = self.first.uuid() if isinstance(self.first, base) else None
                return None if first is None else (first, self.salt_pass.uuid())

        _PASS_CLASSES["chain"] = ChainedPass
    return _PASS_CLASSES["chain"]


@contextlib.contextmanager
def capture_output_code() -> Iterator[list[str]]:
    """Collect the source of every module Inductor generates or loads from its cache in the body.

    Like ``run_and_get_code`` without its ``torch._dynamo.reset()``: for checking which code a
    compile produced in the middle of a run. ``GraphLowering.save_output_code`` is the hook both
    the compile and the FX-graph-cache load call (2.11-2.13).
    """
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    old = GraphLowering.save_output_code
    GraphLowering.save_output_code = codes.append  # type: ignore[assignment]
    try:
        yield codes
    finally:
        GraphLowering.save_output_code = old  # type: ignore[assignment]


def allow_checkpoint_forward_side_effects() -> bool:
    """Let Dynamo trace a checkpointed region whose forward mutates outside state; True if set.

    Why: transformers >= 5.2x routes attention helpers through the ``kernels`` package, whose
    decorator sets and resets a module-level context variable inside every decoder layer's
    forward. Dynamo refuses such a side effect inside ``torch.utils.checkpoint`` (it would not be
    replayed in the recompute), drops the whole checkpointed region to eager, and the layers run
    dense. ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`` (2.11-2.13)
    accepts it; the recompute then skips the set/reset pair, which leaves nothing different.
    """
    config = torch._dynamo.config
    if not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # pragma: no cover - moved
        log.warning("sparselora: this torch has no Dynamo switch for side effects under checkpointing; "
                    "checkpointed layers may run eager (dense)")
        return False
    config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return True


def constant_source(name: str) -> Any:
    """A Dynamo source for a tensor the backend adds to a graph module (estimator factors): AOTAutograd
    wants one per lifted buffer of a Dynamo graph (``_param_name_to_source``)."""
    from torch._dynamo.source import ConstantSource

    return ConstantSource(f"__sparselora_{name}")
