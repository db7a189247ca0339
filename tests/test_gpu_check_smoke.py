"""benchmarks/gpu_check.py --smoke: the one-call GPU script runs end to end on CPU at a tiny size.

Why: the device is lent for minutes, once; a script that first breaks there wastes the lease.
The smoke run executes every phase (kernels under the Triton interpreter, ops, train steps with
the eager inner compiler) in a subprocess, and the JSON must carry what the device run reports.
The script's checks compare against float64 references itself; this test asserts they ran and
passed, that the SPARSELORA_DISABLE_TRITON switch check ran, and that the FLOPs ideal agrees with
an independent count of the frozen GEMMs the policy removes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "SPARSELORA_DISABLE_TRITON")}
    # A generous budget: the shared CI cores can be slow; the run itself takes well under a minute idle.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--budget-s", "240", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    res["_md"] = (out / "gpu_check.md").read_text()
    return res


def test_every_phase_ran(smoke: dict) -> None:
    assert set(smoke) >= {"config", "env", "phases", "kernels", "ops", "train", "summary", "notes"}
    assert {k: v["status"] for k, v in smoke["phases"].items()} == dict.fromkeys(("env", "kernels", "ops", "train"), "ok")
    assert smoke["summary"]["correctness_failures"] == 0


def test_kernel_checks_cover_every_kernel_and_dtype(smoke: dict) -> None:
    recs = smoke["kernels"]
    assert all(r["passed"] and r["written"] for r in recs)
    cases = {r["case"] for r in recs if r["path"] == "triton"}
    for kernel in ("rows_gemm", "cols_gemm", "rows_gemm_dx", "cols_gemm_dx"):
        assert kernel in cases
    assert {"rows_gemm+bias+scatter", "cols_gemm w_t", "cols_gemm_dx w_t"} <= cases
    assert {r["dtype"] for r in recs} == {"bf16", "fp16", "fp32"}
    assert sum(r["case"].startswith("op ") for r in recs) == 6
    # The errors are real measurements against float64, not zeros: bf16 rounding shows.
    assert all(0 < r["rel_err"] <= r["tol"] for r in recs)


def test_op_timings_checked_and_timed(smoke: dict) -> None:
    ops = smoke["ops"]
    assert len(ops) == 16  # 12 kernel calls + the 4 columns-side bodies the compiled graph runs
    for r in ops:
        assert r["passed"], r
        for key in ("us", "host_us", "cublas_pregathered_us", "gather_plus_cublas_us", "dense_cublas_us"):
            assert r[key] > 0


def test_train_sides_ideals_and_env_switch(smoke: dict) -> None:
    tr = smoke["train"]
    assert set(tr["sides"]) == {"dense", "sparselora_torch", "sparselora_kernels"}
    for name, side in tr["sides"].items():
        assert side["n"] == tr["steps"] and side["step_s"] > 0, name
    for name in ("sparselora_torch", "sparselora_kernels"):
        side = tr["sides"][name]
        assert side["speedup"] > 0 and side["efficiency_flops"] > 0
        # The time ideal subtracts GEMMs timed alone from the step: on a loaded machine it can be
        # undefined, and then the run says why instead of a number (CI once saw exactly that).
        if tr["time_ideal"].get("ideal"):
            assert side["efficiency_time"] > 0
        else:
            assert "efficiency_time" not in side and "timing noise" in tr["time_ideal"]["why_no_ideal"]
    assert tr["keep_matches_plan"] and smoke["summary"]["losses_finite"]
    assert tr["env_switch_check"]["passed"]
    assert tr["env_switch_check"]["kernels_expected"] is False  # CPU: the ops take the torch path
    assert tr["report"][0]["groups"] == 3 * tr["config"]["layers"]
    # The GEMM list behind the time-based ideal removes exactly the frozen-GEMM FLOPs that the
    # FLOPs model removes (2*M*in*out per forward or dX, layer 0 without q/k/v dX).
    t = tr["time_ideal"]
    m = tr["config"]["batch"] * tr["config"]["seq"]
    removed = sum(g["count"] * 2 * m * (g["dense"][0] * g["dense"][1] - g["kept"][0] * g["kept"][1])
                  for g in t["gemms"])
    fl = tr["flops"]
    assert fl["dense_frozen_flops"] - fl["sparse_frozen_flops"] == removed
    assert fl["ideal"] == pytest.approx(fl["dense_flops"] / fl["sparse_flops"])
    assert "Time-based ideal" in smoke["_md"]
    assert (t["ideal_step_s"] > 0) == (t["ideal"] is not None)
