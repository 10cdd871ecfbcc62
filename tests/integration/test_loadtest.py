"""`make loadtest` end to end, short: it starts its own server on the demo models file, runs
locust headless with every user class in the mix, writes its results and stops everything;
the summary must show requests of every kind and no failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import DEMO_YAML
from tests.unit.k8s_manifests import ROOT


def test_make_loadtest_runs_clean(tmp_path: Path):
    models = tmp_path / "models.yaml"
    models.write_text(DEMO_YAML)
    results = tmp_path / "results"
    settings = {"DURATION": "8", "USERS": "3", "SPAWN_RATE": "3", "MODELS": str(models),
                "RESULTS": str(results)}
    env = {**os.environ, "LOADTEST_WEIGHT_TEXT2IMAGE": "1", "LOADTEST_WEIGHT_EDIT": "1",
           "LOADTEST_WEIGHT_STREAM": "1", "OMP_NUM_THREADS": "1"}
    venv = Path(sys.executable).parent.parent
    if shutil.which("make"):
        # -o: use the venv running this test as is, never rebuild it from here.
        command = ["make", "-s", "-o", f"{venv}/.blockserve-installed", "loadtest",
                   f"VENV={venv}", *(f"{key}={value}" for key, value in settings.items())]
    else:
        command = [sys.executable, "loadtests/run.py", "--duration", settings["DURATION"],
                   "--users", settings["USERS"], "--spawn-rate", settings["SPAWN_RATE"],
                   "--models", str(models), "--results", str(results)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (run,) = results.iterdir()
    assert {"locust_stats.csv", "locust_failures.csv", "summary.md"} <= {
        path.name for path in run.iterdir()}
    summary = (run / "summary.md").read_text()
    assert "failures: 0," in summary and "result: PASS" in summary, summary
    for endpoint in ("/v1/images/generations", "/v1/images/edits", "/v1/jobs/{id}/events",
                     "job text2image (streamed)"):
        assert f"| {endpoint} |" in summary, summary
    aggregated = next(line for line in summary.splitlines() if "| Aggregated |" in line)
    requests, failures = (int(cell) for cell in aggregated.split("|")[3:5])
    assert requests > 10 and failures == 0, aggregated
