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
