"""Measuring a training step: peak memory, executed FLOPs, machine description, summaries.

Why one module: the demo and the benchmarks report the same quantities and must measure them
the same way. Memory on CPU is the process RSS sampled by a background thread (the
``ru_maxrss`` high-water mark cannot be reset, so it cannot separate two runs in one process);
on CUDA it is ``torch.cuda.max_memory_allocated`` after a reset. FLOPs come from the symbolic
model in ``sparselora_fx.flops`` evaluated with the sparsities the backend's report states.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..flops import LayerShape, evaluate, flops_dense_lora, flops_sparselora
from ..policy import layer_index
from ..runtime.estimators import get_estimator

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class PeakMemory:
    """Context manager: peak memory while the body runs, as ``peak`` and ``delta`` bytes.

    Why: the demo runs two trainings in one process; only a resettable peak tells them apart.
    CPU: RSS sampled every ``interval`` s by a thread (a short spike between samples can be
    missed: an estimate, stated as such). CUDA: allocator peak (exact, tensors only).
    ``delta`` is the peak above the level when the body began.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)

    @property
    def method(self) -> str:
        return "cuda max_memory_allocated" if self.device.type == "cuda" else "sampled process RSS"

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def layer_sparsities(reports: Iterable[Any], num_layers: int) -> list[dict[str, float | None]]:
    """Per layer, the sparsity the backend applied to each group kind (None: dense).

    Why: the FLOPs of the sparse side must follow what was actually rewritten, not what the
    policy was meant to do; the backend's reports say it group by group.
    """
    out: list[dict[str, float | None]] = [{"mlp": None, "attn_qk": None, "attn_vo": None} for _ in range(num_layers)]
    for report in reports:
        for g in report.groups:
            i = layer_index(g.name)
            if i is None or i >= num_layers or g.sparsity is None:
                continue
            key = "mlp" if g.kind in ("gated_mlp", "mlp") else g.kind
            if key in out[i]:
                out[i][key] = g.sparsity
    return out


def estimator_flops_args(spec: Any, tokens: int) -> tuple[str, int | None, int | None] | None:
    """(estimator, k, samples) of the FLOPs model for a policy's EstimatorSpec at `tokens` tokens.

    token_sample projects m = min(T, max(samples, floor(fraction * T))) tokens exactly; random
    costs nothing (None).
    """
    if spec.kind == "svd":
        return "svd", spec.rank, None
    if spec.kind == "token_sample":
        m = spec.samples if not spec.fraction else get_estimator(
            "token_sample", samples=spec.samples, fraction=spec.fraction).sample_count(tokens)
        return "sample", None, min(tokens, m)
    return None


def step_flops(shape: LayerShape, batch: int, seq: int, sparsities: Sequence[dict[str, float | None]],
               estimators: Mapping[str, Any] | None = None, f_out: float = 0.0) -> int:
    """Executed FLOPs of one training step (forward, backward, estimator) for a per-layer policy.

    Why: ``flops_sparselora`` takes one sparsity and one estimator for all layers and groups;
    demo policies keep the first and last layers dense and use a different estimator per group
    kind. Each layer is evaluated alone (layer 0 sees a frozen embedding: no input gradient),
    each sparse group kind adds its own estimator's cost, and the LM head is added once.
    ``estimators`` maps "mlp" / "attn_qk" / "attn_vo" to EstimatorSpecs (default: the policy
    defaults). All-None sparsities give dense LoRA.
    """
    from ..policy import DEFAULT_ESTIMATORS

    estimators = dict(DEFAULT_ESTIMATORS if estimators is None else estimators)
    total = 0
    head = 0
    for i, s in enumerate(sparsities):
        if all(v is None for v in s.values()):
            exprs = flops_dense_lora(shape, batch, seq, n_layers=1, input_grad=i > 0)
        else:
            exprs = flops_sparselora(shape, batch, seq, s["mlp"], s["attn_qk"], s["attn_vo"], f_out,
                                     8, n_layers=1, input_grad=i > 0)
        vals = evaluate({"total": exprs["total"], "lm_head": exprs["lm_head"], "estimator": exprs["estimator"]})
        total += vals["total"] - vals["lm_head"] - vals["estimator"]
        head = vals["lm_head"]
        for kind, sparsity in s.items():
            args = None if sparsity is None else estimator_flops_args(estimators[kind], batch * seq)
            if args is None:
                continue
            only = {k: (sparsity if k == kind else None) for k in ("mlp", "attn_qk", "attn_vo")}
            est = flops_sparselora(shape, batch, seq, only["mlp"], only["attn_qk"], only["attn_vo"], f_out,
                                   args[1], args[0], args[2], n_layers=1, input_grad=i > 0)["estimator"]
            total += evaluate({"estimator": est})["estimator"]
    return total + head


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, min, max and spread (max - min) of a list of timings, in seconds."""
    if not times:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "spread": float("nan"), "n": 0}
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "spread": max(times) - min(times), "n": len(times)}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, load, torch, GPU.

    Why: CPU timings on a shared machine mean little without the load average beside them.
    """
    dev = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info
