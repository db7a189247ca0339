"""DDP on CPU (2 processes, gloo) with the sparselora backend and DDPOptimizer's graph splitting."""

from __future__ import annotations

from pathlib import Path

import torch

from tests._dist import report_summary, run_ranks

STEPS = 2


def _train(mode: str, rank: int) -> tuple[dict, list]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparselora_fx.backend import LAST_REPORTS
    from sparselora_fx.models import build_tiny_model, tiny_batch

    torch._dynamo.reset()
    LAST_REPORTS.clear()
    # rank 256 in float64 makes ~2 MB of LoRA weights: with 1 MB buckets (DDP's first bucket is 1 MiB)
    # DDPOptimizer splits the graph at bucket boundaries, so the backend sees several graphs
    model = build_tiny_model("llama", num_layers=1, dtype=torch.float64, init_lora_b=True, lora_rank=256)
    ddp = DDP(model, bucket_cap_mb=1)
    if mode != "plain":
        sparsity = 0.0 if mode == "sparse0" else 0.5
        ddp = torch.compile(ddp, backend="sparselora",
                            options={"inner": "aot_eager", "sparsity": sparsity, "progress": False})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(STEPS):
        loss = ddp(**tiny_batch("llama", seed=100 * step + rank)).loss  # each rank its own data
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": torch.stack(losses), "lora": lora}, report_summary(LAST_REPORTS)


def _worker(rank: int, out_dir: Path) -> None:
    """One rank: plain DDP, then the backend at sparsity 0 and 0.5; saves losses, LoRA weights, reports."""
    for mode in ("plain", "sparse0", "sparse5"):
        result, reports = _train(mode, rank)
        torch.save(result, out_dir / f"{mode}-{rank}.pt")
        (out_dir / f"{mode}-{rank}.reports").write_text(repr(reports))


def test_ddp_sparsity0_equals_plain_ddp_and_sparse_run_reports(tmp_path: Path) -> None:
    """Plain DDP vs the backend under DDPOptimizer (default graph splitting), 2 ranks on gloo."""
    import ast

    run_ranks(_worker, tmp_path)
    load = lambda mode, r: torch.load(tmp_path / f"{mode}-{r}.pt", weights_only=True)  # noqa: E731
    for rank in range(2):
        plain, ours = load("plain", rank), load("sparse0", rank)
        torch.testing.assert_close(ours["losses"], plain["losses"], rtol=1e-10, atol=1e-12)
        for name, ref in plain["lora"].items():
            torch.testing.assert_close(ours["lora"][name], ref, rtol=1e-10, atol=1e-12, msg=name)
    for name, w in load("sparse0", 0)["lora"].items():  # DDP keeps the ranks' LoRA weights identical
        torch.testing.assert_close(w, load("sparse0", 1)["lora"][name], rtol=0, atol=0)

    for rank in range(2):
        sparse = load("sparse5", rank)
        assert torch.isfinite(sparse["losses"]).all()
        assert not torch.equal(sparse["losses"][1:], load("plain", rank)["losses"][1:])  # something ran sparse
        reports = ast.literal_eval((tmp_path / f"sparse5-{rank}.reports").read_text())
        assert len(reports) > 1, reports  # DDPOptimizer split the graph
        assert sum(r["groups"] for r in reports) >= 1
        # every unit a split graph holds is either in a group or listed as dense, with the reason
        for r in reports:
            assert set(r["units"]) <= set(r["grouped"]) | {n for n, reason in r["skipped"] if reason}, r
        assert any(r["skipped"] for r in reports), reports  # the splits cut groups: reported, not silent
