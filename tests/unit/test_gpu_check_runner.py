"""The GPU check's runner: budgets, prerequisites, skips, errors, reports and the watchdog.

A GPU loan is short; these are what make `bench/gpu_check.py` stop cleanly and always leave a
report, tested with real (if small) checks, in process and, for the watchdog, as a child
process that the watchdog must end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_checks.runner import (  # noqa: E402
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Budget,
    Check,
    CheckSkipped,
    Outcome,
    Report,
    Runner,
)


def _report(tmp_path: Path) -> Report:
    return Report(tmp_path, {"mode": "test", "environment": {"device": "cpu"}})


def _written(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "gpu_check.json").read_text())


def test_all_passing_checks_exit_0_and_write_both_reports(tmp_path: Path) -> None:
    checks = [Check("a", lambda: Outcome("fine", {"rows": [{"x": 1, "y": 2.5}]})),
              Check("b", lambda: Outcome("also fine", {"figures": {"ms": 12.5}}), needs=("a",))]
    assert Runner(Budget(60), _report(tmp_path)).run(checks) == EXIT_OK
    report = _written(tmp_path)
    assert report["state"] == "finished" and report["exit_code"] == EXIT_OK
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("a", "passed"),
                                                                    ("b", "passed")]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| a | passed |" in markdown and "| x | y |" in markdown and "- ms: 12.5" in markdown


def test_a_failed_or_raising_check_fails_the_run_and_its_dependants_are_skipped(
        tmp_path: Path) -> None:
    def boom() -> Outcome:
        raise RuntimeError("kernel exploded")

    checks = [Check("bad", lambda: Outcome("wrong figure", ok=False)),
              Check("raises", boom),
              Check("after", lambda: Outcome("runs anyway")),
              Check("dependant", lambda: Outcome("never"), needs=("raises",))]
    assert Runner(Budget(60), _report(tmp_path)).run(checks) == EXIT_FAILED
    statuses = {c["name"]: c for c in _written(tmp_path)["checks"]}
    assert statuses["bad"]["status"] == "failed"
    assert statuses["raises"]["status"] == "error"
    assert "RuntimeError: kernel exploded" in statuses["raises"]["summary"]
    assert statuses["after"]["status"] == "passed"
    assert statuses["dependant"]["status"] == "skipped"
    assert "needs raises" in statuses["dependant"]["summary"]


def test_the_budget_skips_what_does_not_fit_and_exits_2(tmp_path: Path) -> None:
    def slow() -> Outcome:
        time.sleep(0.3)
        return Outcome("took its time")

    checks = [Check("slow", slow), Check("big", lambda: Outcome("never"), min_seconds=5),
              Check("cheap", lambda: Outcome("still fits"))]
    assert Runner(Budget(1.0), _report(tmp_path)).run(checks) == EXIT_INCOMPLETE
    statuses = {c["name"]: c for c in _written(tmp_path)["checks"]}
    assert statuses["big"]["status"] == "skipped"
    assert statuses["big"]["summary"].startswith("budget:")
    assert statuses["cheap"]["status"] == "passed"


def test_a_check_that_cannot_run_here_is_skipped_with_its_reason(tmp_path: Path) -> None:
    def needs_ray() -> Outcome:
        raise CheckSkipped("ray is not installed here")

    code = Runner(Budget(60), _report(tmp_path)).run([Check("pool", needs_ray)])
    assert code == EXIT_INCOMPLETE
    (check,) = _written(tmp_path)["checks"]
    assert (check["status"], check["summary"]) == ("skipped", "ray is not installed here")


def test_names_must_be_unique_and_budgets_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        Runner(Budget(1), _report(tmp_path)).run([Check("a", Outcome), Check("a", Outcome)])
    with pytest.raises(ValueError, match="positive"):
        Budget(0)


def test_the_watchdog_ends_a_stuck_check_and_leaves_the_report(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT / "bench")!r})
        from gpu_checks.runner import Budget, Check, Outcome, Report, Runner
        checks = [Check("quick", lambda: Outcome("done")),
                  Check("stuck", lambda: time.sleep(60)),
                  Check("never", lambda: Outcome("never"))]
        report = Report(Path({str(tmp_path)!r}), {{"mode": "test"}})
        sys.exit(Runner(Budget(0.5), report, grace_s=0.5).run(checks))
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == EXIT_INTERRUPTED, done.stdout + done.stderr
    assert time.monotonic() - start < 30
    report = _written(tmp_path)
    assert report["state"] == "interrupted" and report["exit_code"] == EXIT_INTERRUPTED
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        ("quick", "passed"), ("stuck", "interrupted"), ("never", "skipped")]
    assert "budget exceeded" in done.stdout
