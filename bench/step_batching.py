"""Benchmark: step-level vs request-level scheduling under open-loop load, side by side.

Two `blockserve serve` processes on free loopback ports serve the same models, one with
`BLOCKSERVE_SCHEDULING=step` (requests join and leave the denoiser's batch between steps), one
with `request` (a batch of equal requests runs from first step to last; others wait). Both get
the very same open-loop load: Poisson arrivals (seeded) at each rate, each request 4 or 20
steps (half and half, seeded), for `--duration` seconds; a request's latency counts from its
scheduled arrival, so a late client never hides queueing. Runs alternate between the two
servers (the order flips each round), so load from elsewhere on the machine hits a run, not a
mode. Printed per model and rate: throughput, p50/p95 per class (4 and 20 steps), the mean
requests per denoiser forward, errors; then the goals (`bench/open_loop.py`, which the GPU
check's `sd.step_scheduling` shares):

- at the lowest rate where request-level p95 (per class) is at least 2x its unloaded latency,
  step-level p95 <= 0.6x request-level p95;
- the highest rate at which every class's p95 stays within 3x its unloaded latency: step-level
  >= 1.5x request-level's.

Before the load, `--boundary` measures the cost of a step boundary on a lone request in this
process (one torch thread, batch-invariant kernels as the server runs them; `--repeats`
interleaved pairs, the median of the per-pair ratios): the library's steppable loop (`LoopRun`,
what every pipeline call now runs) against the plain loop it replaced, timed before any engine
exists in the process, then a lone request through the engine's step scheduler (thread
hand-offs, per-step reports) against a plain pipeline call. Goal: <= 3%.

Models: the trained default model (tiny-shapes-sd, 64x64, guidance 5) and a random-weight
tiny SD (32x32, guidance 7.5), both on the CPU.

    python bench/step_batching.py [--models shapes tiny-sd] [--rates R ...] [--duration 20]
        [--rounds 1] [--seed 0] [--threads 1] [--workers 1] [--boundary] [--repeats 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from open_loop import MODES, goal_lines, percentile, schedule  # noqa: E402
from serve_throughput import Server, free_port, start, wait_ready  # noqa: E402

CLASSES = (4, 20)
MODELS = {  # name: (models-file entry, size, guidance, default rates per second)
    "shapes": ("tiny-shapes-sd", 64, 5.0, (1.0, 2.0, 4.0, 6.0, 8.0)),
    "tiny-sd": ("tiny-sd", 32, 7.5, (2.0, 5.0, 10.0, 20.0, 30.0)),
}


@dataclass
class Run:
    """One mode at one rate: every request's class and latency, and the forward sizes."""

    latencies: dict[int, list[float]] = field(default_factory=lambda: {c: [] for c in CLASSES})
    errors: int = 0
    seconds: float = 0.0
    forward_requests: float = 0.0  # sum of requests over forwards
    forwards: float = 0.0

    def add(self, other: Run) -> None:
        for c in CLASSES:
            self.latencies[c] += other.latencies[c]
        self.errors += other.errors
        self.seconds += other.seconds
        self.forward_requests += other.forward_requests
        self.forwards += other.forwards

    @property
    def completed(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def p(self, q: int, cls: int) -> float:
        return percentile(self.latencies[cls], q)

    @property
    def per_forward(self) -> float:
        return self.forward_requests / self.forwards if self.forwards else float("nan")


def start_server(mode: str, models: Path, folder: Path, threads: int, workers: int) -> Server:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads * workers), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "BLOCKSERVE_SCHEDULING": mode,
           "BLOCKSERVE_WORKERS": str(workers), "BLOCKSERVE_QUEUE_SIZE": "2000",
           "BLOCKSERVE_REQUEST_TIMEOUT_SECONDS": "3600", "BLOCKSERVE_LOG_LEVEL": "warning",
           "BLOCKSERVE_CACHE_DIR": str(folder / "cache")}
    script = Path(sys.executable).with_name("blockserve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    server = start(mode, [*command, "serve", "--models", str(models), "--port", str(port)],
                   env, folder, port)
    wait_ready(server, "/readyz")
    return server


def forward_totals(server: Server, model: str) -> tuple[float, float]:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    totals = []
    for kind in ("sum", "count"):
        match = re.search(rf'^blockserve_step_batch_size_{kind}\{{model="{re.escape(model)}"\}} '
                          r"(\S+)$", text, re.M)
        totals.append(float(match.group(1)) if match else 0.0)
    return totals[0], totals[1]


def body(model: str, size: int, guidance: float, steps: int, seed: int) -> dict:
    return {"model": model, "prompt": f"a red circle on a blue background {seed % 7}",
            "size": f"{size}x{size}", "num_inference_steps": steps, "guidance_scale": guidance,
            "seed": seed}


async def run_load(server: Server, model: str, size: int, guidance: float,
                   arrivals: list[tuple[float, int, int]]) -> Run:
    run = Run()
    before = forward_totals(server, model)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()

        async def one(at: float, steps: int, seed: int) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            response = await client.post("/v1/images/generations",
                                         json=body(model, size, guidance, steps, seed))
            if response.status_code == 200:
                run.latencies[steps].append(time.perf_counter() - (start + at))
            else:
                run.errors += 1

        await asyncio.gather(*(one(*arrival) for arrival in arrivals))
        run.seconds = time.perf_counter() - start
    after = forward_totals(server, model)
    run.forward_requests, run.forwards = after[0] - before[0], after[1] - before[1]
    return run


def unloaded(servers: dict[str, Server], model: str, size: int, guidance: float,
             repeats: int = 7) -> dict[str, dict[int, float]]:
    """Median latency of a lone request per mode and class: `repeats` lone requests to each
    server in turn (after one warm-up each), so a slow moment hits both modes alike."""
    times: dict[str, dict[int, list[float]]] = {m: {c: [] for c in CLASSES} for m in servers}
    clients = {mode: httpx.Client(base_url=server.base_url, timeout=600)
               for mode, server in servers.items()}
    try:
        for index in range(repeats + 1):
            for steps in CLASSES:
                for mode in (list(clients) if index % 2 else list(reversed(clients))):
                    start = time.perf_counter()
                    response = clients[mode].post(
                        "/v1/images/generations",
                        json=body(model, size, guidance, steps, 7 + index))
                    response.raise_for_status()
                    if index:  # the first round warms up
                        times[mode][steps].append(time.perf_counter() - start)
    finally:
        for client in clients.values():
            client.close()
    return {mode: {c: statistics.median(v) for c, v in by_class.items()}
            for mode, by_class in times.items()}


def print_model(name: str, size: int, base: dict[str, dict[int, float]],
                results: dict[float, dict[str, Run]]) -> None:
    print(f"\n{name} {size}x{size}, unloaded: " + "; ".join(
        f"{mode}: " + ", ".join(f"{c} steps {base[mode][c]:.3f}s" for c in CLASSES)
        for mode in MODES))
    header = (f"{'rate/s':>6} | {'mode':<7} | {'img/s':>6} | " + " | ".join(
        f"{c:>2} steps p50/p95 s" for c in CLASSES) + f" | {'req/fwd':>7} | errors")
    print(header)
    print("-" * len(header))
    for rate, by_mode in results.items():
        for mode in MODES:
            run = by_mode[mode]
            classes = " | ".join(f"{run.p(50, c):7.3f}/{run.p(95, c):7.3f}  " for c in CLASSES)
            print(f"{rate:6.2f} | {mode:<7} | {run.completed / run.seconds:6.2f} | {classes} | "
                  f"{run.per_forward:7.2f} | {run.errors}")
        step, request = by_mode["step"], by_mode["request"]
        ratios = ", ".join(f"{c} steps {step.p(95, c) / request.p(95, c):.2f}x" for c in CLASSES)
        print(f"{rate:6.2f} | p95 step/request: {ratios}")
    p95 = {rate: {mode: {c: run.p(95, c) for c in CLASSES} for mode, run in by_mode.items()}
           for rate, by_mode in results.items()}
    for line in goal_lines(p95, base, CLASSES):
        print(line)


# -- the step boundary, in process -----------------------------------------------------------


def boundary(checkpoint: Path, size: int, guidance: float, repeats: int) -> None:
    """The cost of stepping a lone request from outside (see the module docstring)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from blocks import ModularPipeline
    from blocks.batch_invariance import batch_invariant
    from blocks.composites import LoopSequentialPipelineBlocks
    from blocks.stepping import steppable
    from service.engine import Engine
    from service.jobs import GenerationJob
    from service.models_file import parse_models
    from service.placement import LocalRunner
    from service.registry import ModelRegistry

    torch.set_num_threads(1)

    class PlainLoop(LoopSequentialPipelineBlocks):
        """The loop as it ran before it was steppable: children called in a plain for loop."""

        def __call__(self, components, state):
            block_state = self.get_block_state(state)
            for i, t in enumerate(block_state.timesteps):
                for _, child in self.sub_blocks.items():
                    components, block_state = child(components, block_state, i=i, t=t)
            self.set_block_state(state, block_state)
            return components, state

    def with_plain_loops(block):
        for child in getattr(block, "sub_blocks", {}).values():
            if steppable(child):
                child.__class__ = type("Plain" + type(child).__name__,
                                       (PlainLoop, type(child)), {"__call__": PlainLoop.__call__})
            else:
                with_plain_loops(child)
        return block

    steppable_pipe = ModularPipeline.from_pretrained(str(checkpoint))
    steppable_pipe.load_components(dtype=torch.float32)
    steppable_pipe.set_progress_bar_config(disable=True)
    plain_pipe = with_plain_loops(steppable_pipe.blocks).init_pipeline(str(checkpoint))
    plain_pipe.update_components(**{k: v for k, v in steppable_pipe.components.items()
                                    if v is not None and k != "scheduler"})
    plain_pipe.set_progress_bar_config(disable=True)

    def call(pipe) -> None:
        with batch_invariant():
            pipe(prompt=["a red circle on a blue background"], num_inference_steps=20,
                 guidance_scale=guidance, height=size, width=size,
                 generator=[torch.Generator().manual_seed(1)], output="images")

    def pairs(name: str, run, baseline) -> None:
        """`repeats` interleaved pairs (the order flips each pair, after one warm-up pair):
        the median of each pair's ratio, so a slow moment on the machine hits one pair."""
        times: dict[str, list[float]] = {"run": [], "baseline": []}
        for index in range(repeats + 1):
            order = [("run", run), ("baseline", baseline)]
            for which, function in order if index % 2 else reversed(order):
                start = time.perf_counter()
                function()
                if index:
                    times[which].append(time.perf_counter() - start)
        ratio = statistics.median(a / b for a, b in zip(times["run"], times["baseline"],
                                                            strict=True))
        print(f"  {name}: {statistics.median(times['run']) * 1000:.1f} ms vs "
              f"{statistics.median(times['baseline']) * 1000:.1f} ms, per-pair ratio "
              f"{ratio:.3f}x ({'met' if ratio <= 1.03 else 'NOT met'}, goal <= 1.03x)")

    print(f"step boundary, {checkpoint.name} {size}x{size}, 20 steps, 1 thread, median of "
          f"{repeats} interleaved pairs, against the plain loop:")
    # The library first, with no engine (and none of its threads) in the process.
    pairs("steppable loop (library)", lambda: call(steppable_pipe), lambda: call(plain_pipe))
    registry = ModelRegistry(parse_models({"models": {"m": {
        "family": "sd", "path": str(checkpoint), "defaults": {"size": f"{size}x{size}"},
        "sizes": [f"{size}x{size}"], "limits": {"max_steps": 50}}}}, checkpoint))
    registry.load("m")
    engine = Engine(registry, LocalRunner())
    engine.start()

    def served() -> None:
        engine.submit(GenerationJob(model="m", workflow="text2image",
                                    prompt="a red circle on a blue background", n=1,
                                    width=size, height=size, steps=20, seed=1,
                                    guidance_scale=guidance)).result()

    try:
        pairs("lone request through the engine's step scheduler", served,
              lambda: call(plain_pipe))
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rates", type=float, nargs="+",
                        help="requests per second (open loop); default: per model")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    parser.add_argument("--rounds", type=int, default=1, help="runs per mode and rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="BLOCKSERVE_WORKERS")
    parser.add_argument("--boundary", action="store_true",
                        help="measure the step boundary's cost first")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="blockserve-step-bench-"))
    servers: list[Server] = []
    try:
        sys.path.insert(0, str(ROOT))
        from blocks.stable_diffusion.tiny_model import write_tiny_sd

        tiny = write_tiny_sd(folder / "tiny-sd")
        shapes = ROOT / "assets" / "tiny-shapes-sd"
        if args.boundary:
            boundary(shapes, 64, 5.0, args.repeats)
        models = folder / "models.yaml"
        models.write_text(
            "models:\n"
            f"  tiny-shapes-sd:\n    family: sd\n    path: {shapes}\n"
            "    defaults: {steps: 20, guidance_scale: 5, size: 64x64}\n    sizes: [64x64]\n"
            f"  tiny-sd:\n    family: sd\n    path: {tiny}\n"
            "    defaults: {steps: 4, guidance_scale: 7.5, size: 32x32}\n    sizes: [32x32]\n")
        servers = [start_server(mode, models, folder, args.threads, args.workers)
                   for mode in MODES]
        by_mode = dict(zip(MODES, servers, strict=True))
        print(f"open-loop Poisson arrivals for {args.duration:g}s per run, half 4 and half 20 "
              f"steps (seed {args.seed}), {args.rounds} run(s) per mode and rate, "
              f"{args.workers} worker(s) x {args.threads} torch thread(s)")
        for key in args.models:
            model, size, guidance, default_rates = MODELS[key]
            base = unloaded(by_mode, model, size, guidance)
            results: dict[float, dict[str, Run]] = {}
            turn = 0
            for rate in args.rates or default_rates:
                results[rate] = {mode: Run() for mode in MODES}
                for round_ in range(args.rounds):
                    arrivals = schedule(rate, args.duration, args.seed + round_, CLASSES)
                    for mode in (MODES if turn % 2 == 0 else tuple(reversed(MODES))):
                        run = asyncio.run(run_load(by_mode[mode], model, size, guidance,
                                                   arrivals))
                        results[rate][mode].add(run)
                    turn += 1
            print_model(model, size, base, results)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
