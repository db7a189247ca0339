"""Shared test set-up: deterministic, strict (a dense fallback is a failure), isolated caches."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("SPARSELORA_STRICT", "1")
torch.set_num_threads(1)  # tiny models: one thread is faster and immune to a busy neighbour
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test starts with empty Dynamo caches, a seeded RNG and its own factor cache dir."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if "SPARSELORA_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("SPARSELORA_CACHE_DIR", str(tmp_path_factory.mktemp("factors")))
    yield
    torch._dynamo.reset()


def trace_graphs(model, *args, **kwargs):
    """Dynamo-only trace: the list of GraphModules Dynamo hands a backend for ``model(*args, **kwargs)``."""
    graphs = []

    def capture(gm, example_inputs, **_):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=capture)(*args, **kwargs)
    return graphs


def opt_layerdrop_breaks_graph() -> bool:
    """transformers < ~5.2x compares ``torch.rand([]) < layerdrop`` in OPT's training forward even
    at layerdrop 0: a data-dependent branch, so Dynamo splits the graph per layer (upstream code,
    not ours). Newer releases guard it with ``layerdrop > 0``."""
    import inspect

    from transformers.models.opt import modeling_opt

    return "self.layerdrop > 0" not in inspect.getsource(modeling_opt.OPTDecoder.forward)


def analysis_model(arch: str, **kwargs):
    """A tiny model for Dynamo-only analysis tests: in eval mode where upstream code would break the graph."""
    from sparselora_fx.models import build_tiny_model

    model = build_tiny_model(arch, **kwargs)
    if arch == "opt" and opt_layerdrop_breaks_graph():
        model.eval()
    return model
