"""`/healthz` watched from another process while a test attacks the server.

`HealthWatch(url)` starts `python -m tests.integration.health_watch URL`: a probe that asks
`/healthz` (a fresh connection each time, as an orchestrator's probe does) every
`INTERVAL_S` and prints when each probe started and ended and its status. It runs in its own
process so the attacking test's threads (and their GIL) can't delay it.

On a shared two-core machine a probe can be slow because the machine starved *the probe*,
not because the server blocked its event loop. The probe process also runs a ticker thread
that sleeps 10 ms at a time and reports every gap longer than `STALL_S`: a probe overlapping
such a gap measured the machine, not the server, and is set aside (and counted). A window
with only set-aside probes is judged by its fastest one.

    with watch.window() as window:
        ...attack...
    window.assert_healthy()          # every probe started in the window answered 200 in 1 s
"""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

INTERVAL_S = 0.05
STALL_S = 0.25
LIMIT_S = 1.0


@dataclass(frozen=True)
class Probe:
    start: float  # time.monotonic(), shared by every process on the machine
    end: float
    status: int  # 0: no answer (refused, reset, timed out)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Window:
    watch: HealthWatch
    start: float
    end: float = 0.0
    probes: list[Probe] = field(default_factory=list)
    set_aside: list[Probe] = field(default_factory=list)

    def collect(self, timeout_s: float = 20.0) -> None:
        """Wait for the probes started in the window to finish (one started after it has)."""
        deadline = time.monotonic() + timeout_s
        while not self.watch.probes_after(self.end):
            assert self.watch.alive(), "the health probe process died"
            assert time.monotonic() < deadline, f"no /healthz answer within {timeout_s}s"
            time.sleep(0.02)
        self.probes, self.set_aside = self.watch.split(self.start, self.end)

    def assert_healthy(self, limit_s: float = LIMIT_S) -> float:
        """Every probe started in the window (and the first after it) answered 200 within
        `limit_s`; returns the worst latency counted."""
        self.collect()
        counted = self.probes or sorted(self.set_aside, key=lambda p: p.seconds)[:1]
        assert counted, "no /healthz probe ran during the window"
        bad = [p for p in counted if p.status != 200 or p.seconds > limit_s]
        assert not bad, (f"/healthz too slow or failing during the attack: "
                         f"{[(p.status, round(p.seconds, 3)) for p in bad]} "
                         f"({len(self.set_aside)} probes set aside: the probe was starved)")
        worst = max(p.seconds for p in counted)
        self.watch.worst = max(self.watch.worst, worst)
        return worst


class HealthWatch:
    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        root = Path(__file__).resolve().parents[2]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.health_watch", parts.hostname or "",
             str(parts.port)], cwd=root, stdout=subprocess.PIPE, text=True)
        self._lock = threading.Lock()
        self._probes: list[Probe] = []
        self._stalls: list[tuple[float, float]] = []
        self.worst = 0.0  # the worst latency any window counted
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            kind, *values = line.split()
            with self._lock:
                if kind == "probe":
                    self._probes.append(Probe(float(values[0]), float(values[1]),
                                              int(values[2])))
                elif kind == "stall":
                    self._stalls.append((float(values[0]), float(values[1])))

    def alive(self) -> bool:
        return self._process.poll() is None

    def probes_after(self, moment: float) -> bool:
        with self._lock:
            return any(p.start > moment for p in self._probes)

    def split(self, start: float, end: float) -> tuple[list[Probe], list[Probe]]:
        """(probes to count, probes set aside) among those overlapping [start, end], plus the
        first one started after it."""
        with self._lock:
            inside = [p for p in self._probes if p.end >= start and p.start <= end]
            after = [p for p in self._probes if p.start > end][:1]
            stalls = list(self._stalls)
        counted, aside = [], []
        for probe in inside + after:
            starved = any(a < probe.end and b > probe.start for a, b in stalls)
            (aside if starved else counted).append(probe)
        return counted, aside

    @contextlib.contextmanager
    def window(self) -> Iterator[Window]:
        window = Window(self, time.monotonic())
        yield window
        window.end = time.monotonic()

    def close(self) -> None:
        self._process.kill()
        self._process.wait()


def _probe_forever(host: str, port: int) -> None:
    printing = threading.Lock()

    def say(line: str) -> None:
        # Two threads print: one locked write per line, or a loaded machine interleaves them
        # ("200stall ...").
        with printing:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def ticker() -> None:
        last = time.monotonic()
        while True:
            time.sleep(0.01)
            now = time.monotonic()
            if now - last > STALL_S:
                say(f"stall {last:.4f} {now:.4f}")
            last = now

    threading.Thread(target=ticker, daemon=True).start()
    while True:
        start = time.monotonic()
        status = 0
        connection = http.client.HTTPConnection(host, port, timeout=10)
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection.request("GET", "/healthz", headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            status = response.status
        connection.close()
        say(f"probe {start:.4f} {time.monotonic():.4f} {status}")
        time.sleep(INTERVAL_S)


if __name__ == "__main__":
    _probe_forever(sys.argv[1], int(sys.argv[2]))
