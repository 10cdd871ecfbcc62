"""`make loadtest`: start `blockserve serve` on a free loopback port, run locust headless
against it for a bounded time, write `loadtests/results/<timestamp>/` (locust's CSVs and a
`summary.md`), stop the server. Exit status 0 when no request failed, 1 otherwise.

    python loadtests/run.py [--models FILE] [--duration 60] [--users 6] [--spawn-rate 2]
                            [--results loadtests/results]

It starts its own server so a run is reproducible on one machine; to load an existing
deployment, run locust on loadtests/locustfile.py with --host directly. Black-box: it imports
nothing from blockserve (the server is the `blockserve` command next to this Python).
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 300.0  # the first start of the default models file writes a tiny checkpoint


@dataclass(frozen=True)
class LoadStage:
    """One constant-load phase: `users` ramped up at `spawn_rate`/s, held for `duration_s`."""

    users: int
    spawn_rate: float
    duration_s: int


@dataclass(frozen=True)
class EndpointResult:
    """One row of locust's stats: an endpoint, or `Aggregated` for the whole run."""

    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @classmethod
    def from_row(cls, row: dict[str, str]) -> EndpointResult:
        def number(key: str) -> float:
            value = row.get(key, "")
            return float(value) if value not in ("", "N/A") else float("nan")

        return cls(row["Type"], row["Name"], int(row["Request Count"]),
                   int(row["Failure Count"]), number("Requests/s"), number("50%"),
                   number("95%"), number("99%"))


@dataclass(frozen=True)
class LoadTestResult:
    stage: LoadStage
    server: str
    models_file: str
    endpoints: list[EndpointResult]
    total: EndpointResult
    locust_exit_code: int

    @property
    def passed(self) -> bool:
        return self.total.requests > 0 and self.total.failures == 0

    def markdown(self) -> str:
        lines = [
            "# blockserve load test", "",
            f"- server: {self.server} (models file: {self.models_file})",
            f"- load: {self.stage.users} users, spawn rate {self.stage.spawn_rate}/s, "
            f"{self.stage.duration_s} s",
            f"- requests: {self.total.requests}, failures: {self.total.failures}, "
            f"RPS: {self.total.rps:.2f}",
            f"- latency (ms): p50 {self.total.p50_ms:.0f}, p95 {self.total.p95_ms:.0f}, "
            f"p99 {self.total.p99_ms:.0f}",
            f"- result: {'PASS' if self.passed else 'FAIL'}", "",
            "| type | endpoint | requests | failures | RPS | p50 ms | p95 ms | p99 ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for e in [*self.endpoints, self.total]:
            lines.append(f"| {e.method} | {e.name} | {e.requests} | {e.failures} | {e.rps:.2f} "
                         f"| {e.p50_ms:.0f} | {e.p95_ms:.0f} | {e.p99_ms:.0f} |")
        return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    script = Path(sys.executable).with_name(name)
    return str(script) if script.exists() else name


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"blockserve serve exited with {server.returncode}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"blockserve serve not ready after {READY_TIMEOUT_S:.0f}s")


def _stop(process: subprocess.Popen[bytes], first: int = signal.SIGINT) -> None:
    if process.poll() is None:
        process.send_signal(first)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def run(stage: LoadStage, models: Path | None, results_root: Path) -> LoadTestResult:
    out = results_root / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [_bin("blockserve"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if models is not None:
        command += ["--models", str(models)]
    env = {**os.environ, "BLOCKSERVE_API_KEYS": "", "BLOCKSERVE_LOG_LEVEL": "warning",
           "HF_HUB_OFFLINE": "1"}
    server_log = out / "server.log"
    with server_log.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        _wait_ready(url, server, server_log)
        with (out / "locust.log").open("wb") as log:
            locust = subprocess.Popen(
                [_bin("locust"), "-f", str(HERE / "locustfile.py"), "--headless",
                 "--host", url, "--users", str(stage.users),
                 "--spawn-rate", str(stage.spawn_rate), "--run-time", f"{stage.duration_s}s",
                 "--stop-timeout", "10", "--csv", str(out / "locust"), "--only-summary",
                 "--loglevel", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, env={**env, "BLOCKSERVE_API_KEY": ""},
                start_new_session=True)
            try:
                code = locust.wait(timeout=stage.duration_s + 60)
            except subprocess.TimeoutExpired:
                _stop(locust, signal.SIGTERM)
                code = -1
    finally:
        _stop(server)
    with (out / "locust_stats.csv").open() as stats:
        rows = [EndpointResult.from_row(row) for row in csv.DictReader(stats)]
    (total,) = [row for row in rows if row.name == "Aggregated"]
    result = LoadTestResult(stage, url, str(models or "built-in default"),
                            [row for row in rows if row.name != "Aggregated"], total, code)
    (out / "summary.md").write_text(result.markdown())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="models file (default: the built-in one)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    parser.add_argument("--users", type=int, default=6, help="simulated users (default 6)")
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.users < 1 or args.spawn_rate <= 0:
        parser.error("--duration and --users must be >= 1, --spawn-rate > 0")
    if args.models is not None and not args.models.is_file():
        parser.error(f"--models: no such file: {args.models}")
    stage = LoadStage(args.users, args.spawn_rate, args.duration)
    result = run(stage, args.models, args.results)
    print(result.markdown())
    print(f"results: {args.results}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
