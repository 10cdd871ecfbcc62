"""Running a list of checks inside a time budget, and reporting each as soon as it finishes.

A GPU comes in short loans, so a check run must (1) say what it found as it goes, (2) stop
cleanly when its time is up, and (3) leave a report behind whatever happens:

- `Runner.run(checks)` runs checks in order. A check is skipped when less than its
  `min_seconds` is left of the budget, when a check it `needs` did not pass, or when it
  raises `CheckSkipped` (it cannot run here, e.g. a package is missing); long checks
  also look at `Budget.left()` between their own steps and return early (`partial`).
- Each result is printed on one line when its check ends, and the JSON and markdown reports
  (`gpu_check.json`, `gpu_check.md` in the output folder) are rewritten after every check, so a
  run killed from outside still leaves everything finished so far.
- A watchdog fires `grace_s` after the budget: a check stuck in a long kernel or a hung
  process is marked interrupted, the report is written and the process exits at once
  (`EXIT_INTERRUPTED`), so the loan never runs past budget + grace.

Exit codes: 0 every check passed; 1 a check failed or raised; 2 none failed but some were
skipped (budget, or what they need did not pass); 3 the watchdog stopped the run.

Not handled here: what the checks do, and which run (`bench/gpu_check.py`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 2, 3
PASSED, FAILED, ERROR, SKIPPED, INTERRUPTED = "passed", "failed", "error", "skipped", "interrupted"
REPORT_NAME = "gpu_check"

_STARTED = time.monotonic()


def log(message: str) -> None:
    """Print one line with the seconds since the run started, at once (a loan's output is
    read while it runs)."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", flush=True)


class Budget:
    """Seconds the whole run may take, counted from its creation or from `start()` (the
    runner starts it with the first check, so imports and set-up don't count)."""

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"budget must be positive seconds, got {seconds}")
        self.seconds = seconds
        self.start()

    def start(self) -> None:
        self._start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class CheckSkipped(Exception):
    """Raised by a check that cannot run here (say, a package missing); it is reported as
    skipped with this message, not as an error."""


@dataclass
class Outcome:
    """What a check found: a one-line summary, figures for the report, and a verdict."""

    summary: str
    data: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    partial: bool = False  # it stopped early because the budget ran low
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    """A named step of the run. `run` returns an `Outcome` or raises (then: an error)."""

    name: str
    run: Callable[[], Outcome]
    min_seconds: float = 0.0  # skipped when less than this is left of the budget
    needs: tuple[str, ...] = ()  # checks that must have passed before this one runs


@dataclass
class CheckResult:
    name: str
    status: str
    seconds: float = 0.0
    summary: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    partial: bool = False


class Report:
    """The run's results as `gpu_check.json` and `gpu_check.md` in `out_dir` (if given)."""

    def __init__(self, out_dir: Path | None, meta: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.meta = dict(meta)
        self.results: list[CheckResult] = []
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def as_dict(self, state: str, exit_code: int | None) -> dict[str, Any]:
        return {**self.meta, "state": state, "exit_code": exit_code,
                "checks": [asdict(result) for result in self.results]}

    def write(self, state: str, exit_code: int | None = None) -> None:
        if self.out_dir is None:
            return
        data = self.as_dict(state, exit_code)
        _write_atomic(self.out_dir / f"{REPORT_NAME}.json",
                      json.dumps(data, indent=2, default=_jsonable) + "\n")
        _write_atomic(self.out_dir / f"{REPORT_NAME}.md", render_markdown(data))


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


class Runner:
    """Runs checks in order within `budget`, reporting into `report` (see the module doc)."""

    def __init__(self, budget: Budget, report: Report, grace_s: float = 30.0) -> None:
        self.budget = budget
        self.report = report
        self.grace_s = grace_s
        self._lock = threading.RLock()
        self._current: str | None = None
        self._current_start = 0.0
        self._pending: list[Check] = []
        self._done = False

    def run(self, checks: Sequence[Check]) -> int:
        names = [check.name for check in checks]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must be unique: {names}")
        self.budget.start()
        watchdog = threading.Timer(max(0.0, self.budget.left()) + self.grace_s, self._expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            self._pending = list(checks)
            while True:
                with self._lock:
                    if not self._pending:
                        break
                    check = self._pending.pop(0)
                self._run_one(check)
        finally:
            watchdog.cancel()
        with self._lock:
            self._done = True
            code = self._exit_code()
            self.report.write("finished", code)
        counts = {status: sum(r.status == status for r in self.report.results)
                  for status in (PASSED, FAILED, ERROR, SKIPPED)}
        log(f"done in {self.budget.elapsed():.1f}s: " + ", ".join(
            f"{count} {status}" for status, count in counts.items() if count) + f"; exit {code}")
        return code

    def _exit_code(self) -> int:
        statuses = {result.status for result in self.report.results}
        if statuses & {FAILED, ERROR}:
            return EXIT_FAILED
        if statuses & {SKIPPED, INTERRUPTED}:
            return EXIT_INCOMPLETE
        return EXIT_OK

    def _run_one(self, check: Check) -> None:
        passed = {r.name for r in self.report.results if r.status == PASSED}
        missing = [need for need in check.needs if need not in passed]
        if missing:
            self._record(CheckResult(check.name, SKIPPED,
                                     summary=f"needs {', '.join(missing)}, which did not pass"))
            return
        left = self.budget.left()
        if left < check.min_seconds:
            self._record(CheckResult(check.name, SKIPPED, summary=(
                f"budget: {max(left, 0):.0f}s left, it needs at least {check.min_seconds:.0f}s")))
            return
        log(f"{check.name} ...")
        with self._lock:
            self._current, self._current_start = check.name, time.monotonic()
            self.report.write(f"running {check.name}")
        start = time.monotonic()
        try:
            outcome = check.run()
        except CheckSkipped as reason:
            result = CheckResult(check.name, SKIPPED, time.monotonic() - start, str(reason))
        except Exception as error:  # a check that raises is an error, and the run goes on
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            result = CheckResult(check.name, ERROR, time.monotonic() - start, detail,
                                 notes=[traceback.format_exc(limit=8)])
        else:
            result = CheckResult(check.name, PASSED if outcome.ok else FAILED,
                                 time.monotonic() - start, outcome.summary, outcome.data,
                                 outcome.notes, outcome.partial)
        with self._lock:
            self._current = None
            self._record(result)  # (dropped if the watchdog finished the run meanwhile)

    def _record(self, result: CheckResult) -> None:
        with self._lock:
            if self._done:
                return
            self.report.results.append(result)
            partial = " (partial: budget)" if result.partial else ""
            log(f"{result.name}: {result.status.upper()}{partial} "
                f"{result.seconds:.1f}s — {result.summary}")
            if result.status == ERROR and result.notes:
                print(result.notes[0], file=sys.stderr, flush=True)
            self.report.write("running")

    def _expire(self) -> None:
        """The watchdog: mark what runs and what is left, write the report, exit now."""
        with self._lock:
            if self._done:
                return
            self._done = True
            if self._current is not None:
                self.report.results.append(CheckResult(
                    self._current, INTERRUPTED, time.monotonic() - self._current_start,
                    f"still running {self.grace_s:.0f}s past the {self.budget.seconds:.0f}s "
                    "budget: stopped"))
            for check in self._pending:
                self.report.results.append(CheckResult(check.name, SKIPPED,
                                                       summary="budget: the run was stopped"))
            self.report.write("interrupted", EXIT_INTERRUPTED)
        log(f"budget exceeded by {self.grace_s:.0f}s: stopped (exit {EXIT_INTERRUPTED})")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # a stuck kernel or child process can't be unwound


# ----------------------------------------------------------------------------- markdown


def render_markdown(report: dict[str, Any]) -> str:
    """The report for people: environment, one row per check, then each check's figures."""
    lines = [f"# GPU check ({report.get('mode', '?')}): {report.get('state')}", ""]
    environment = report.get("environment") or {}
    if environment:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in environment.items()]
        lines.append("")
    lines += ["| check | status | seconds | summary |", "|---|---|---|---|"]
    for check in report["checks"]:
        status = check["status"] + (" (partial)" if check.get("partial") else "")
        lines.append(f"| {check['name']} | {status} | {check['seconds']:.1f} | "
                     f"{_cell(check['summary'])} |")
    for check in report["checks"]:
        if not check["data"] and not check["notes"]:
            continue
        lines += ["", f"## {check['name']}", "", check["summary"], ""]
        for key, value in check["data"].items():
            lines += _render_value(key, value)
        for note in check["notes"]:
            lines += ["", "```", note.rstrip(), "```"] if "\n" in note else ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def _render_value(key: str, value: Any) -> list[str]:
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        columns = list(dict.fromkeys(column for row in value for column in row))
        return ["", f"**{key}**", "", "| " + " | ".join(columns) + " |",
                "|" + "---|" * len(columns)] + [
            "| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |"
            for row in value] + [""]
    if isinstance(value, dict):
        return ["", f"**{key}**", ""] + [f"- {k}: {_cell(v)}" for k, v in value.items()] + [""]
    return [f"- {key}: {_cell(value)}"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=_jsonable)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")
