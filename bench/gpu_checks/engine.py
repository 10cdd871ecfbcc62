"""The service's engine on a real model: throughput by batch size, and batched vs alone.

`ServiceHarness` is the embedded service itself (`service.app.create_app` on a generated
models file) without HTTP: its registry loads the models (the run's pipelines share those
weights), its engine runs `GenerationJob`s exactly as the routes submit them.

- `check_throughput`: after an untimed warm-up round of each batch size, for each batch size
  b, rounds of b jobs submitted together (the engine batches them: each result says how
  many images its call made), images per second and the speed-up over b = 1. Images of the
  same seed made alone and in batches are compared: on a CPU the batch-invariant kernels
  make them identical (checked); on CUDA they may differ, and how much is reported.
- `check_alone`: the same jobs on a model whose `max_batch_size` is 1, submitted together:
  each must run alone, and give the very bytes the b = 1 runs gave (what the README promises
  a model that must be bit-exact on a GPU).

Not handled here: HTTP (the routes add validation and encoding, measured elsewhere).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpu_checks.runner import Budget, Outcome, log

JOB_TIMEOUT_S = 900.0
SEED_BASE = 1000
WARMUP_SEED = 999_000  # seeds of the untimed rounds, apart from the compared ones


class ServiceHarness:
    """The embedded app's registry and engine on `models` (a models file's `models:`)."""

    def __init__(self, models: dict[str, dict[str, Any]], cache_dir: Path,
                 max_batch_size: int = 8, batch_window_ms: float = 20.0) -> None:
        from service.app import create_app
        from service.models_file import parse_models
        from service.settings import Settings

        # Settings(...) rather than from_env: BLOCKSERVE_* variables of the machine must not
        # change what is measured.
        settings = Settings(cache_dir=cache_dir, max_batch_size=max_batch_size,
                            batch_window_ms=batch_window_ms, queue_size=1024,
                            request_timeout_seconds=JOB_TIMEOUT_S, workers=1)
        self.app = create_app(settings, parse_models({"models": models}, cache_dir))
        self.context = self.app.state.service
        self._started = False

    def load(self, name: str) -> Any:
        """The registry's loaded model `name` (loaded now if it is not yet)."""
        return self.context.registry.load(name)

    def submit(self, job: Any) -> Future:
        """Queue `job` on the engine (started on first use): its `GenerationResult` future."""
        if not self._started:
            self.context.engine.start()
            self._started = True
        return self.context.engine.submit(job)

    def run_jobs(self, jobs: Sequence[Any]) -> list[Any]:
        """Submit `jobs` together, wait for all: their `GenerationResult`s in order."""
        futures = [self.submit(job) for job in jobs]
        return [future.result(timeout=JOB_TIMEOUT_S) for future in futures]

    def stop(self) -> None:
        if self._started:
            self.context.engine.stop()
            self._started = False


@dataclass
class EngineRun:
    """What one model's engine checks share: the job shape and the images made so far."""

    harness: ServiceHarness
    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    alone: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> image made alone
    batched: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (b, seed)

    def job(self, seed: int, model: str | None = None, steps: int | None = None) -> Any:
        from service.jobs import GenerationJob

        return GenerationJob(model=model or self.model, workflow="text2image",
                             prompt=self.prompt, n=1, width=self.width, height=self.height,
                             steps=steps or self.steps, seed=seed,
                             guidance_scale=self.guidance_scale)


def _pixels(result: Any) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"))


def _difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    delta = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs_8bit": int(delta.max()), "differing_fraction": float((delta > 0).mean())}


def check_throughput(run: EngineRun, batches: Sequence[int], rounds: int, budget: Budget,
                     must_match_alone: bool) -> Outcome:
    rows: list[dict[str, Any]] = []
    partial = False
    # Untimed rounds first, one of each batch size: the engine's first calls pay one-time
    # costs (its threads' first CUDA calls, kernel selection for each shape) for several
    # calls, not one. On an H200, SD's lone 512x512 job took 1.7 s, then ~0.95 s for the
    # next four calls, and 0.58-0.61 s (a direct pipeline call's time) only after a round of
    # batch 2 had run.
    for b in batches:
        run.harness.run_jobs([run.job(WARMUP_SEED + i) for i in range(b)])
    for b in batches:
        if rows and budget.left() < 2 * rows[-1]["seconds"] * b / rows[-1]["batch"] + 5:
            partial = True
            break
        sizes: list[int] = []
        start = time.perf_counter()
        for round_index in range(rounds):
            seeds = [SEED_BASE + round_index * b + i for i in range(b)]
            results = run.harness.run_jobs([run.job(seed) for seed in seeds])
            for seed, result in zip(seeds, results, strict=True):
                sizes.append(result.batch_size)
                if b == 1:
                    run.alone[seed] = _pixels(result)
                else:
                    run.batched[(b, seed)] = _pixels(result)
        seconds = time.perf_counter() - start
        images = b * rounds
        rows.append({"batch": b, "images": images, "seconds": round(seconds, 3),
                     "images_per_s": round(images / seconds, 3),
                     "mean_images_per_call": round(statistics.mean(sizes), 2)})
        log(f"  batch {b}: {images / seconds:.2f} images/s "
            f"(mean call {statistics.mean(sizes):.1f} images)")
    base = rows[0]["images_per_s"] if rows and rows[0]["batch"] == 1 else None
    for row in rows:
        row["vs_batch_1"] = round(row["images_per_s"] / base, 2) if base else None
    compared = [{"batch": b, "seed": seed, **_difference(image, run.alone[seed])}
                for (b, seed), image in sorted(run.batched.items()) if seed in run.alone]
    identical = all(row["max_abs_8bit"] == 0 for row in compared)
    ok = bool(rows) and (identical or not must_match_alone)
    best = max(rows, key=lambda row: row["images_per_s"]) if rows else None
    summary = (", ".join(f"b{r['batch']} {r['images_per_s']:.2f}/s" for r in rows)
               + (f" (best {best['vs_batch_1']}x batch 1)" if best and best["vs_batch_1"] else "")
               + f"; batched vs alone: {'identical' if identical else 'differ'}"
               + ("" if identical else f" (max {max(r['max_abs_8bit'] for r in compared)}/255)"))
    return Outcome(summary, {"throughput": rows, "batched_vs_alone": compared}, ok, partial)


def check_alone(run: EngineRun, alone_model: str, jobs: int, must_match_batched: bool) -> Outcome:
    run.harness.load(alone_model)  # shares the weights already held (the registry dedups)
    seeds = [SEED_BASE + i for i in range(jobs)]
    results = run.harness.run_jobs([run.job(seed, alone_model) for seed in seeds])
    calls = [result.batch_size for result in results]
    images = {seed: _pixels(result) for seed, result in zip(seeds, results, strict=True)}
    versus_alone = [{"seed": seed, **_difference(images[seed], run.alone[seed])}
                    for seed in seeds if seed in run.alone]
    versus_batched = [{"batch": b, "seed": seed, **_difference(images[seed], image)}
                      for (b, seed), image in sorted(run.batched.items()) if seed in images]
    reproducible = all(row["max_abs_8bit"] == 0 for row in versus_alone)
    batched_same = all(row["max_abs_8bit"] == 0 for row in versus_batched)
    ok = (all(size == 1 for size in calls) and bool(versus_alone) and reproducible
          and (batched_same or not must_match_batched))
    worst = max((row["max_abs_8bit"] for row in versus_batched), default=0)
    frac = max((row["differing_fraction"] for row in versus_batched), default=0.0)
    summary = (f"{jobs} jobs at once, max_batch_size 1: calls of {sorted(set(calls))} image(s); "
               f"same bytes as the earlier lone runs: {reproducible} ({len(versus_alone)} "
               f"compared); vs the same seeds batched: "
               + ("identical" if batched_same else
                  f"max {worst}/255, up to {frac:.2%} of values differ"))
    return Outcome(summary, {"calls": calls, "vs_alone": versus_alone,
                             "vs_batched": versus_batched}, ok)
