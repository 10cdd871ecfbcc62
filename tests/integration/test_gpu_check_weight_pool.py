"""`bench/gpu_check.py --smoke`'s Ray check: the weight pool's replica path on a local cluster.

On a GPU the check gives each replica a quarter of the card and watches the allocator; here
the same actors run without a GPU share, so that the code the GPU run depends on (Ray init
with the repository on the workers' path, the actors, the pool's load / idle offload /
re-acquire, the report) is exercised in every `make test`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install '.[ray]')")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_weight_pool_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--budget-s", "300",
         "--only", "sd.checkpoint", "weight_pool", "--out", str(out),
         "--scratch", str(tmp_path / "scratch")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    checks = {c["name"]: c for c in json.loads((out / "gpu_check.json").read_text())["checks"]}
    pool = checks["weight_pool"]
    assert pool["status"] == "passed", pool
    data = pool["data"]
    assert data["registry_after_load"]["loads"] == 1  # two replicas, one load
    assert data["registry_after_reuse"]["loads"] == 1  # back from the pool, not the disk
    assert all(not replica["resident_after_idle"] for replica in data["replicas"])
    assert data["same_output_across_replicas"] and data["same_output_after_offload"]
