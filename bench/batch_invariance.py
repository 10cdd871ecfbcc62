"""Benchmark: what batch-invariant CPU kernels cost, and what they buy, on the same pipeline.

For each family's tiny checkpoint (random-weight SD, the trained shapes SD model, FLUX.2
[klein]), one blockserve pipeline is timed with diffusers' default kernels and under
`blocks.batch_invariance.batch_invariant()`, interleaved (default, invariant, default, ...,
order swapped every round) after warm-up, for a lone image and a batch of 8, with one torch
thread by default. Prints median seconds per call and the ratio invariant / default (the
median of each round's pair: a burst of load from elsewhere on the machine hits a round, not a
kernel set), and for each kernel set the largest difference between an image made in the
batch and the same image made alone (float, and how many 8-bit values differ): what the
invariant kernels exist to remove. With `--parallel N`, also the
pipeline's own ceiling for a server with N engine workers: images/s of N threads, each with its
own pipeline objects (shared weights) making batches of 8 — no HTTP, no queue.

    python bench/batch_invariance.py [--runs 10] [--steps 4] [--size 64] [--threads 1]
        [--parallel N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"a {colour} {shape} on a {background} background" for colour, shape, background in (
    ("red", "circle", "blue"), ("green", "square", "white"), ("blue", "triangle", "black"),
    ("yellow", "circle", "red"), ("white", "square", "green"), ("black", "triangle", "yellow"),
    ("red", "square", "green"), ("blue", "circle", "white"))]


def checkpoints(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT))
    from blocks.flux2.tiny_model import write_tiny_flux2_klein
    from blocks.stable_diffusion.tiny_model import write_tiny_sd

    return {"sd (random tiny)": write_tiny_sd(folder / "sd"),
            "shapes-sd (trained)": ROOT / "assets" / "tiny-shapes-sd",
            "flux2-klein (random tiny)": write_tiny_flux2_klein(folder / "flux2")}


def runner(path: Path, steps: int, size: int, weights_of: Any = None,
           ) -> Callable[[int, bool], np.ndarray]:
    """(images, invariant?) -> the images of one seeded call (image i: prompt i, seed i).
    `weights_of`: a runner whose modules this one shares (an engine worker's pipeline)."""
    from blocks import ModularPipeline
    from blocks.batch_invariance import batch_invariant

    pipe = ModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32, strict=True)
    if weights_of is not None:
        shared = weights_of.pipe.components
        pipe.update_components(**{name: component if isinstance(component, torch.nn.Module)
                                  else copy.deepcopy(component)
                                  for name, component in shared.items() if component is not None})
    pipe.set_progress_bar_config(disable=True)
    guidance = {} if "flux2" in str(path) else {"guidance_scale": 5.0}

    def run(count: int, invariant: bool, first: int = 0) -> np.ndarray:
        chosen = range(first, first + count)
        with batch_invariant() if invariant else contextlib.nullcontext():
            return pipe(prompt=[PROMPTS[i] for i in chosen],
                        generator=[torch.Generator().manual_seed(i) for i in chosen],
                        num_inference_steps=steps, height=size, width=size, output_type="np",
                        output="images", **guidance)

    run.pipe = pipe  # type: ignore[attr-defined]
    return run


def parallel_images_per_second(runs: list[Callable], invariant: bool, calls: int) -> float:
    """Images/s of len(runs) threads, each making `calls` batches of 8 on its own pipeline."""
    finished: list[float] = []
    start = time.perf_counter()

    def work(run: Callable) -> None:
        for _ in range(calls):
            run(8, invariant)
        finished.append(time.perf_counter() - start)

    threads = [threading.Thread(target=work, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(runs) * calls * 8 / max(finished)


def batch_vs_alone(run: Callable, invariant: bool) -> tuple[float, int]:
    """(max |batched - alone|, 8-bit values that differ) over every image of a batch of 8."""
    batched = run(8, invariant)
    worst, values = 0.0, 0
    for index in range(8):
        alone = run(1, invariant, index)[0]
        worst = max(worst, float(np.abs(batched[index] - alone).max()))
        values += int(((batched[index] * 255).round() != (alone * 255).round()).sum())
    return worst, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed calls per kernel set")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--parallel", type=int, default=0,
                        help="also time this many threads making batches of 8 at once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    print(f"{args.steps} steps, {args.size}x{args.size}, float32, {args.threads} thread(s), "
          f"median of {args.runs} interleaved calls\n")
    header = (f"{'model':<26} | {'images':>6} | {'default s':>9} | {'invariant s':>11} | "
              f"{'ratio':>6}")  # ratio: median over rounds of invariant / default
    with tempfile.TemporaryDirectory() as folder:
        for name, path in checkpoints(Path(folder)).items():
            run = runner(path, args.steps, args.size)
            print(header)
            print("-" * len(header))
            for count in (1, 8):
                times: dict[bool, list[float]] = {False: [], True: []}
                for invariant in (False, True):  # warm-up
                    run(count, invariant)
                for round_ in range(args.runs):
                    for invariant in ((False, True) if round_ % 2 == 0 else (True, False)):
                        start = time.perf_counter()
                        run(count, invariant)
                        times[invariant].append(time.perf_counter() - start)
                default, invariant = (statistics.median(times[k]) for k in (False, True))
                ratio = statistics.median([a / b for a, b in zip(times[True], times[False],
                                                                  strict=True)])
                print(f"{name:<26} | {count:>6} | {default:9.4f} | {invariant:11.4f} | "
                      f"{ratio:5.2f}x")
            for invariant in (False, True):
                worst, values = batch_vs_alone(run, invariant)
                print(f"  {'invariant' if invariant else 'default'} kernels: batch of 8 vs each "
                      f"alone: max |diff| {worst:.1e}, 8-bit values differing: {values}")
            if args.parallel:
                runs = [run] + [runner(path, args.steps, args.size, weights_of=run)
                                for _ in range(args.parallel - 1)]
                for invariant in (False, True):
                    parallel_images_per_second(runs, invariant, 1)  # warm-up
                    rate = parallel_images_per_second(runs, invariant, args.runs)
                    print(f"  {'invariant' if invariant else 'default'} kernels: "
                          f"{args.parallel} threads making batches of 8: {rate:.1f} images/s")
            print()


if __name__ == "__main__":
    main()
