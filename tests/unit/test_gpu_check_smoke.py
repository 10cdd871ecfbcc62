"""`bench/gpu_check.py --smoke`: the GPU check's code paths at tiny size on the CPU.

The full check runs only where a GPU is lent, so this is what keeps it from rotting: every
check but the Ray one (tests/integration/test_gpu_check_weight_pool.py runs that) must pass,
with the figures the report promises; and `--budget-s` must stop the run cleanly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
FAMILY_CHECKS = ("checkpoint", "load", "parity.float32", "speed.float32", "engine", "alone",
                 "offload_budget", "parity.bfloat16", "speed.bfloat16")
EXPECTED = ["environment", "oom_retry", *(f"sd.{c}" for c in FAMILY_CHECKS),
            *(f"flux2-klein.{c}" for c in FAMILY_CHECKS)]


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out),
         "--scratch", str(tmp_path / "scratch"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    return done, report


def test_smoke_runs_every_check_and_reports_the_figures(tmp_path: Path) -> None:
    start = time.monotonic()
    # A generous budget: the point here is that every path works, not the machine's speed.
    done, report = _run(tmp_path, "--skip", "weight_pool", "--budget-s", "600")
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == EXPECTED
    assert {c["status"] for c in checks.values()} == {"passed"}, done.stdout[-4000:]
    print(f"smoke run: {seconds:.1f}s")  # shown with -s; the budget it must fit is 60 s
    for family in ("sd", "flux2-klein"):
        parity = checks[f"{family}.parity.float32"]["data"]
        assert parity["max_abs_diff"] <= 1e-4
        assert {row["component"] for row in parity["memory"]} >= {"vae", "text_encoder"}
        assert all(row["forwards"] > 0 for row in parity["memory"])
        engine = checks[f"{family}.engine"]["data"]
        assert [row["batch"] for row in engine["throughput"]] == [1, 4]
        assert engine["throughput"][-1]["mean_images_per_call"] == 4  # the engine batched
        assert all(row["max_abs_8bit"] == 0 for row in engine["batched_vs_alone"])
        assert checks[f"{family}.alone"]["data"]["calls"] == [1, 1, 1, 1]
        assert checks[f"{family}.offload_budget"]["data"]["evictions"] > 0
        assert checks[f"{family}.speed.bfloat16"]["data"]["ms_per_image"]["diffusers"] > 0
    retry = checks["oom_retry"]["data"]
    assert [m["reason"] for m in retry["moves_after_pressure"]] == ["evict-oom", "load-retry"]
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| sd.engine | passed |" in markdown


def test_a_short_budget_stops_cleanly_with_a_report(tmp_path: Path) -> None:
    done, report = _run(tmp_path, "--budget-s", "0.5", "--only", "environment", "oom_retry",
                        "sd.checkpoint", "sd.load")
    assert done.returncode == 2, done.stdout + done.stderr
    statuses = {check["name"]: check for check in report["checks"]}
    assert statuses["environment"]["status"] == "passed"
    assert statuses["sd.checkpoint"]["status"] == "skipped"
    assert statuses["sd.checkpoint"]["summary"].startswith("budget:")
    assert statuses["sd.load"]["summary"] == "needs sd.checkpoint, which did not pass"
    assert report["state"] == "finished" and report["exit_code"] == 2
