"""Open-loop load for the step-scheduling measurements, and the two goals they are read by.

`bench/step_batching.py` (HTTP servers on the CPU) and the GPU check's `sd.step_scheduling`
(the engine in process, on a real-size model) send the same kind of load: seeded Poisson
arrivals, each request one of two step counts (half and half), its latency counted from its
scheduled arrival so that a late client never hides queueing. Both judge step-level against
request-level scheduling by the same two goals:

- **onset**: for each class, at the lowest rate where request-level p95 is at least 2x the
  class's unloaded latency, step-level p95 <= 0.6x request-level p95;
- **capacity**: the highest rate at which every class's p95 stays within 3x its unloaded
  latency, step-level >= 1.5x request-level's.

Pure functions of plain numbers: no HTTP, no torch, nothing to install.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np

MODES = ("step", "request")
ONSET_LOAD = 2.0  # request-level p95 / unloaded latency where the onset goal is read
ONSET_GOAL = 0.6  # step-level p95 / request-level p95 there
CAPACITY_BOUND = 3.0  # p95 / unloaded latency that still counts as served
CAPACITY_GOAL = 1.5  # step-level capacity / request-level capacity

# rate -> mode -> class (steps) -> p95 seconds
P95Table = Mapping[float, Mapping[str, Mapping[int, float]]]
# mode -> class -> unloaded (lone) latency in seconds
Unloaded = Mapping[str, Mapping[int, float]]


def schedule(rate: float, duration: float, seed: int, classes: Sequence[int]
             ) -> list[tuple[float, int, int]]:
    """(arrival second, steps, request seed) of Poisson arrivals at `rate` per second for
    `duration` seconds, each request's class drawn half and half from `classes` (two)."""
    rng = np.random.default_rng(seed)
    arrivals, now, index = [], 0.0, 0
    while True:
        now += rng.exponential(1.0 / rate)
        if now > duration:
            return arrivals
        arrivals.append((now, classes[int(rng.random() < 0.5)], seed * 100_000 + index))
        index += 1


def percentile(values: Sequence[float], q: int) -> float:
    """The q-th percentile (inclusive method); the value itself for one, nan for none."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def onset(p95: P95Table, unloaded: Unloaded, cls: int) -> tuple[float, float] | None:
    """(the lowest rate where request-level p95 of class `cls` reached ONSET_LOAD x its
    unloaded latency, step p95 / request p95 at that rate); None if it never did."""
    loaded = [rate for rate, by_mode in p95.items()
              if by_mode["request"][cls] >= ONSET_LOAD * unloaded["request"][cls]]
    if not loaded:
        return None
    rate = min(loaded)
    return rate, p95[rate]["step"][cls] / p95[rate]["request"][cls]


def capacity(p95: P95Table, unloaded: Unloaded, mode: str, classes: Sequence[int]) -> float:
    """The highest rate at which every class's p95 under `mode` stayed within CAPACITY_BOUND x
    its unloaded latency (0 when none did)."""
    within = [rate for rate, by_mode in p95.items()
              if all(by_mode[mode][c] <= CAPACITY_BOUND * unloaded[mode][c] for c in classes)]
    return max(within) if within else 0.0


def goal_lines(p95: P95Table, unloaded: Unloaded, classes: Sequence[int]) -> list[str]:
    """The two goals' verdicts, one line each."""
    verdicts = []
    for cls in classes:
        found = onset(p95, unloaded, cls)
        if found is None:
            verdicts.append(f"{cls} steps: request-level p95 never reached "
                            f"{ONSET_LOAD:g}x unloaded")
            continue
        rate, ratio = found
        verdicts.append(f"{cls} steps at {rate:g}/s: step p95 = {ratio:.2f}x request "
                        f"({'met' if ratio <= ONSET_GOAL else 'NOT met'}, "
                        f"goal <= {ONSET_GOAL:g}x)")
    lines = ["goal 1: " + "; ".join(verdicts)]
    best = {mode: capacity(p95, unloaded, mode, classes) for mode in MODES}
    if best["request"]:
        ratio = best["step"] / best["request"]
        lines.append(f"goal 2: highest rate with p95 <= {CAPACITY_BOUND:g}x unloaded: step "
                     f"{best['step']:g}/s, request {best['request']:g}/s: {ratio:.2f}x "
                     f"({'met' if ratio >= CAPACITY_GOAL else 'NOT met'}, goal >= "
                     f"{CAPACITY_GOAL:g}x; bounded by the rates tried)")
    else:
        lines.append(f"goal 2: request-level p95 exceeded {CAPACITY_BOUND:g}x unloaded at every "
                     f"rate tried; step stayed within it up to {best['step']:g}/s")
    return lines
