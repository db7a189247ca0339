"""Shared by the multi-process CPU tests (DDP, FSDP2): spawn gloo ranks, summarise their reports."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable[[int, Path], None], out_dir: Path, world: int = WORLD) -> None:
    """Run ``worker(rank, out_dir)`` in ``world`` spawned processes joined in one gloo group.

    ``worker`` must be a module-level function (spawn pickles it by name); it writes its results
    under ``out_dir`` for the test to load.
    """
    mp.spawn(_rank_main, args=(worker, world, free_port(), str(out_dir)), nprocs=world, join=True)


def _rank_main(rank: int, worker: Callable[[int, Path], None], world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPARSELORA_STRICT="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, Path(out_dir))
    finally:
        dist.destroy_process_group()


def report_summary(reports: list[Any]) -> list[dict]:
    """What the backend found per graph, as plain data a rank can write and the test can read back."""
    return [{"groups": len(r.groups), "units": [u.fqn for u in r.units],
             "grouped": [u.fqn for g in r.groups for u in g.units],
             "sparsities": [g.sparsity for g in r.groups],
             "skipped": [(s.name, s.reason) for s in r.skipped]} for r in reports]
