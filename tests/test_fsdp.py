"""FSDP2 (``fully_shard``) on CPU (2 processes, gloo) with the sparselora backend compiled per layer.

FSDP2 all-gathers each layer's parameters before its forward and frees the unsharded storage with
``storage.resize_(0)`` after it, then gathers them again for backward. The backend sees those
unsharded weights at compile time and its sparse ops save them for backward, so the test checks
that nothing we do pins that storage and that backward sees the re-gathered values.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests._dist import WORLD, report_summary, run_ranks

STEPS = 3
#: mode -> sparsity of the backend (None: plain eager FSDP2)
MODES = {"eager": None, "sparse0": 0.0, "sparse5": 0.5}


def _model(sparsity: float | None, shard: bool) -> torch.nn.Module:
    """The tiny LoRA Llama; each decoder layer compiled in place (and sharded, then the root)."""
    from torch.distributed.fsdp import fully_shard

    from sparselora_fx.models import build_tiny_model

    model = build_tiny_model("llama", num_layers=2, dtype=torch.float64, init_lora_b=True)
    for layer in model.base_model.model.model.layers:
        if shard:
            fully_shard(layer)
        if sparsity is not None:
            layer.compile(backend="sparselora",
                          options={"inner": "aot_eager", "sparsity": sparsity, "progress": False})
    if shard:
        fully_shard(model)
    return model


def _lora(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    from sparselora_fx.models import tiny_batch

    return tiny_batch("llama", seed=100 * step + rank)  # each rank its own data


def _train(sparsity: float | None, rank: int) -> tuple[dict, list]:
    """STEPS SGD steps under FSDP2: per-step losses, the first step's full LoRA grads, the reports."""
    from sparselora_fx.backend import LAST_REPORTS

    torch._dynamo.reset()
    LAST_REPORTS.clear()
    model = _model(sparsity, shard=True)
    opt = torch.optim.SGD([p for _, p in _lora(model)], lr=0.1)
    losses, first_grads = [], {}
    for step in range(STEPS):
        loss = model(**_batch(step, rank)).loss
        loss.backward()
        if step == 0:  # FSDP2 reduce-scatters the mean over ranks; gather the full gradient
            first_grads = {n: p.grad.full_tensor() for n, p in _lora(model)}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "grads": first_grads}, report_summary(LAST_REPORTS)


def _worker(rank: int, out_dir: Path) -> None:
    for mode, sparsity in MODES.items():
        result, reports = _train(sparsity, rank)
        torch.save(result, out_dir / f"{mode}-{rank}.pt")
        (out_dir / f"{mode}-{rank}.reports").write_text(repr(reports))


def _unsharded_first_step(sparsity: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same compiled model without FSDP, one process: step-0 loss per rank's batch, mean grads."""
    model = _model(sparsity, shard=False)
    losses = []
    for rank in range(WORLD):
        loss = model(**_batch(0, rank)).loss
        (loss / WORLD).backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad for n, p in _lora(model)}


@pytest.mark.parametrize("shape", [(8, 4), (256, 128)], ids=["hashed-whole", "sampled"])
def test_factors_leave_the_weight_storage_resizable(shape: tuple[int, int]) -> None:
    """FSDP2 frees an unsharded weight with ``storage.resize_(0)``: building its factors must not pin it."""
    from sparselora_fx.factor_cache import get_factors

    weight = torch.randn(shape)
    assert get_factors(weight, 2, at_compile_time=True) is not None
    assert get_factors(weight.t(), 2, at_compile_time=True) is not None
    weight.untyped_storage().resize_(0)  # raised "Trying to resize storage that is not resizable"


@pytest.mark.slow
def test_fsdp2_per_layer_compile_matches_eager_and_trains_sparse(tmp_path: Path) -> None:
    run_ranks(_worker, tmp_path)
    load = lambda mode, r: torch.load(tmp_path / f"{mode}-{r}.pt", weights_only=True)  # noqa: E731
    reports = lambda mode, r: ast.literal_eval((tmp_path / f"{mode}-{r}.reports").read_text())  # noqa: E731

    # (a) sparsity 0: the backend under FSDP2 equals eager FSDP2 (losses of every step, LoRA grads)
    for rank in range(WORLD):
        eager, ours = load("eager", rank), load("sparse0", rank)
        torch.testing.assert_close(ours["losses"], eager["losses"], rtol=1e-10, atol=1e-12)
        assert ours["grads"].keys() == eager["grads"].keys()
        for name, ref in eager["grads"].items():
            torch.testing.assert_close(ours["grads"][name], ref, rtol=1e-10, atol=1e-12, msg=name)
        found = reports("sparse0", rank)
        assert len(found) == 2 and all(len(r["units"]) == 7 for r in found), found  # one graph per layer

    # (b) sparsity 0.5: every layer's groups run sparse, 3 steps train with finite losses
    ref_losses, ref_grads = _unsharded_first_step(0.5)
    for rank in range(WORLD):
        sparse = load("sparse5", rank)
        assert torch.isfinite(sparse["losses"]).all()
        assert not torch.equal(sparse["losses"], load("eager", rank)["losses"])  # something ran sparse
        found = reports("sparse5", rank)
        assert len(found) == 2, found
        for r in found:
            assert r["groups"] == 3 and r["sparsities"] == [0.5] * 3 and not r["skipped"], r
        # sharding changes nothing: the same sparse model unsharded gives the same step-0 loss, and
        # the mean of its grads over both ranks' batches (backward read the re-gathered weights)
        torch.testing.assert_close(sparse["losses"][0], ref_losses[rank], rtol=1e-10, atol=1e-12)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(sparse["grads"][name], ref, rtol=1e-10, atol=1e-12, msg=name)
