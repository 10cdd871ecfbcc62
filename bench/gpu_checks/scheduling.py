"""Step-level against request-level scheduling on a real-size model, under open-loop load.

`check_step_scheduling` sends the same seeded Poisson load (`bench/open_loop.py`: half short,
half long requests, their latency counted from the scheduled arrival) to two models of one
checkpoint in one engine: one scheduled at step granularity (the default), one at request
granularity (`scheduling: request` in the models file). The offered loads are fractions of
the lone service time of the mix, so one setting fits any GPU and the CPU smoke run; the
modes take turns, rate by rate. It reports each class's unloaded latency, p50/p95 per mode
and rate, the mean number of requests that shared a step, and `open_loop`'s two goals (onset
and capacity).

On the CPU, `bench/step_batching.py` measures the same goals through HTTP. This is the figure
for a GPU, where a shared forward costs differently (on an H200, SD at 512x512 made 1.57x the
images per second at batch 2 as at batch 1, so a pair's forward costs about 1.27x a lone one).
The check fails only when a job fails: the goals are figures, not correctness.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from open_loop import MODES, capacity, goal_lines, onset, percentile, schedule

from gpu_checks.engine import JOB_TIMEOUT_S, EngineRun
from gpu_checks.runner import Budget, Outcome, log

SEED_BASE = 500_000  # request seeds of this check, apart from the other engine checks'


def classes_for(steps: int) -> tuple[int, int]:
    """The short and the long class: a fifth of the model's steps (4 of SD's 20), and all."""
    return max(1, steps // 5), steps


def _lone(run: EngineRun, models: dict[str, str], classes: Sequence[int], repeats: int
          ) -> dict[str, dict[int, float]]:
    """Median latency of a lone job per mode and class, the modes taking turns (after one
    untimed round)."""
    times: dict[str, dict[int, list[float]]] = {m: {c: [] for c in classes} for m in models}
    for index in range(repeats + 1):
        for steps in classes:
            for mode in (MODES if index % 2 else tuple(reversed(MODES))):
                start = time.perf_counter()
                run.harness.run_jobs([run.job(SEED_BASE + index, models[mode], steps)])
                if index:
                    times[mode][steps].append(time.perf_counter() - start)
    return {mode: {c: statistics.median(v) for c, v in by_class.items()}
            for mode, by_class in times.items()}


def _open_loop(run: EngineRun, model: str, arrivals: Sequence[tuple[float, int, int]]
               ) -> dict[str, Any]:
    """Submit each job at its arrival second; latencies per class, shared steps, errors."""
    ends: dict[int, float] = {}
    futures = []
    start = time.perf_counter()
    for index, (at, steps, seed) in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        future = run.harness.submit(run.job(seed, model, steps))
        # Called by the thread that finishes the job (or here, if it is done already).
        future.add_done_callback(lambda _, index=index: ends.setdefault(index,
                                                                         time.perf_counter()))
        futures.append(future)
    latencies: dict[int, list[float]] = {}
    shared, errors = [], 0
    for index, ((at, steps, _), future) in enumerate(zip(arrivals, futures, strict=True)):
        try:
            result = future.result(timeout=JOB_TIMEOUT_S)
        except Exception as error:  # counted and reported
            errors += 1
            log(f"    job {index} ({steps} steps) failed: {error!r}")
            continue
        latencies.setdefault(steps, []).append(ends[index] - (start + at))
        shared.append(result.batch_size)
    return {"latencies": latencies, "shared": shared, "errors": errors,
            "seconds": time.perf_counter() - start}


def check_step_scheduling(run: EngineRun, request_model: str, budget: Budget,
                          loads: Sequence[float], run_seconds: float, repeats: int) -> Outcome:
    """`loads`: offered loads as fractions of the mix's lone service time (0.5: on average
    half a lone job's worth of work arrives per second of one); `run_seconds` of arrivals per
    mode and rate; `repeats` lone jobs per mode and class."""
    run.harness.load(request_model)  # shares the weights already held (the registry dedups)
    models = {"step": run.model, "request": request_model}
    classes = classes_for(run.steps)
    unloaded = _lone(run, models, classes, repeats)
    service = statistics.mean(unloaded["step"].values())  # half short, half long
    log("  lone: " + "; ".join(f"{mode} " + ", ".join(
        f"{c} steps {unloaded[mode][c]:.3f}s" for c in classes) for mode in MODES))
    rows, p95, errors, partial = [], {}, 0, False
    for turn, load in enumerate(loads):
        if rows and budget.left() < 2 * 1.5 * run_seconds + 5:
            partial = True
            break
        rate = round(load / service, 3)
        arrivals = schedule(rate, run_seconds, turn, classes)
        row: dict[str, Any] = {"load": load, "rate": rate, "requests": len(arrivals)}
        p95[rate] = {}
        for mode in (MODES if turn % 2 == 0 else tuple(reversed(MODES))):
            outcome = _open_loop(run, models[mode], arrivals)
            errors += outcome["errors"]
            latencies = outcome["latencies"]
            p95[rate][mode] = {c: percentile(latencies.get(c, []), 95) for c in classes}
            row[mode] = {
                "p50_s": {c: round(percentile(latencies.get(c, []), 50), 4) for c in classes},
                "p95_s": {c: round(p95[rate][mode][c], 4) for c in classes},
                "images_per_s": round(len(outcome["shared"]) / outcome["seconds"], 3),
                "mean_requests_sharing_a_step": round(statistics.mean(outcome["shared"]), 2)
                if outcome["shared"] else None,
                "errors": outcome["errors"]}
        row["p95_step_vs_request"] = {
            c: round(p95[rate]["step"][c] / p95[rate]["request"][c], 3) for c in classes}
        rows.append(row)
        log(f"  {rate:g}/s (load {load:g}): p95 step/request " + ", ".join(
            f"{c} steps {p95[rate]['step'][c]:.3f}/{p95[rate]['request'][c]:.3f}s "
            f"({row['p95_step_vs_request'][c]:.2f}x)" for c in classes))
    goals = goal_lines(p95, unloaded, classes) if p95 else []
    data = {"classes": list(classes), "unloaded_s": unloaded, "rates": rows,
            "onset": {c: onset(p95, unloaded, c) for c in classes},
            "capacity_per_s": {mode: capacity(p95, unloaded, mode, classes) for mode in MODES},
            "goals": goals}
    summary = (f"lone {classes[0]}/{classes[1]} steps {unloaded['step'][classes[0]]:.2f}/"
               f"{unloaded['step'][classes[1]]:.2f}s; {len(rows)} rate(s); "
               + "; ".join(goals) + (f"; {errors} job(s) failed" if errors else ""))
    return Outcome(summary, data, ok=bool(rows) and errors == 0, partial=partial)
