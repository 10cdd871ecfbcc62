"""Benchmark: blockserve's server against a naive diffusers server, side by side, under load.

One script, one tiny random-weight Stable Diffusion checkpoint (`write_tiny_sd`, in a temp
folder), two servers as subprocesses on free loopback ports:

- blockserve: `blockserve serve` (the engine: step-level batching by default, `--scheduling
  request` for request-level batching with its `--batch-window-ms`; `--max-batch-size` images
  per forward, `--workers` steps at once, `--threads` torch threads each)
- naive: `bench/baselines/naive_server.py` (FastAPI + one diffusers StableDiffusionPipeline
  behind a lock, one request at a time), `--threads` torch threads for its one call, like one
  blockserve worker (`--naive-threads` to choose otherwise: on a 2-core machine shared with the
  load generator, 2 threads made it slower under load, 12.1 vs 25.4 images/s at 32x32 and
  concurrency 16, as OpenMP threads wait on each other)

Both get the same requests (distinct prompts and seeds; same size, steps, guidance) at each
image size and concurrency level, after a warm-up, in rounds that alternate between the
servers (so load from elsewhere on the machine hits a round, not a server; the median round
counts). Printed per level: images/s and p50/p95 latency of both, the ratios (blockserve /
naive: > 1 is better for throughput, < 1 for latency) and blockserve's mean batch (images
denoised together per step).
Before the load, one same-seed image from each shows the two compute the same thing (max
difference in 8-bit pixel values). Goals: at concurrency 16, >= 3x the naive throughput with a
lower p95; at concurrency 1, a lone request's p50 <= 1.15x the naive server's. Two sizes,
because the result depends on it: at 32x32 the tiny model's per-call overhead dominates and
batching amortises it; at 64x64 its CPU convolutions dominate and a batch saves less per
image.

    python bench/serve_throughput.py [--requests 48] [--rounds 2] [--concurrency 1 4 16]
        [--sizes 32 64] [--steps 4] [--max-batch-size N] [--scheduling step|request]
        [--batch-window-ms MS] [--workers 1] [--threads 1] [--naive-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0
LONE_GOAL = 1.15  # a lone request's p50 against the naive server's


@dataclass
class Server:
    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


@dataclass
class LoadResult:
    """One server at one size and concurrency: every round's wall time, every latency."""

    server: str
    size: int
    concurrency: int
    round_seconds: list[float] = field(default_factory=list)
    requests_per_round: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    batch_sum: float = 0.0  # blockserve only: images and pipeline calls, from its metrics
    batch_count: float = 0.0

    @property
    def images_per_second(self) -> float:
        """The median round's throughput: rounds alternate between servers, so a burst of
        load from elsewhere on the machine hits one round, not one server."""
        return self.requests_per_round / statistics.median(self.round_seconds)

    @property
    def mean_batch(self) -> float | None:
        return self.batch_sum / self.batch_count if self.batch_count else None

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(name: str, command: list[str], env: dict[str, str], folder: Path,
          port: int) -> Server:
    log_path = folder / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=ROOT, start_new_session=True)
    return Server(name, f"http://127.0.0.1:{port}", process, log_path)


def wait_ready(server: Server, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_path.read_text()[-3000:]}")
        try:
            if httpx.get(server.base_url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{server.name} not ready after {READY_TIMEOUT_S}s")


def request_body(index: int, size: int, steps: int) -> dict[str, object]:
    return {"model": "tiny-sd", "prompt": f"a photo of object number {index}",
            "size": f"{size}x{size}", "num_inference_steps": steps, "guidance_scale": 7.5,
            "seed": index}


async def run_round(server: Server, size: int, steps: int, concurrency: int, requests: int,
                    result: LoadResult) -> None:
    """`requests` requests, `concurrency` at a time, added to `result`."""
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            for index in next_index:
                start = time.perf_counter()
                response = await client.post("/v1/images/generations",
                                             json=request_body(index, size, steps))
                result.latencies.append(time.perf_counter() - start)
                if response.status_code != 200 or len(response.json()["data"]) != 1:
                    result.errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.round_seconds.append(time.perf_counter() - start)
        result.requests_per_round = requests


def batch_totals(server: Server) -> tuple[float, float]:
    """(sum, count) of blockserve_batch_size so far."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    values = {}
    for kind in ("sum", "count"):
        match = re.search(rf"^blockserve_batch_size_{kind}\{{[^}}]*\}} (\S+)$", text, re.M)
        values[kind] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def same_seed_difference(servers: list[Server], size: int, steps: int) -> int:
    """Max |difference| of one same-seed image from every server, in 8-bit levels."""
    images = []
    for server in servers:
        response = httpx.post(server.base_url + "/v1/images/generations",
                              json=request_body(0, size, steps), timeout=300)
        response.raise_for_status()
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16))
    return int(max(np.abs(images[0] - other).max() for other in images[1:]))


def print_table(size: int, results: dict[int, dict[str, LoadResult]]) -> None:
    header = (f"{'size':>4} {'conc':>4} | {'server':<10} | {'img/s':>7} | {'p50 s':>7} | "
              f"{'p95 s':>7} | {'batch':>5} | errors")
    print(header)
    print("-" * len(header))
    for concurrency, by_server in results.items():
        for name in ("blockserve", "naive"):
            r = by_server[name]
            batch = f"{r.mean_batch:5.2f}" if r.mean_batch is not None else "    -"
            print(f"{size:>4} {concurrency:>4} | {name:<10} | {r.images_per_second:7.2f} | "
                  f"{r.percentile(50):7.3f} | {r.percentile(95):7.3f} | {batch} | {r.errors}")
        ours, naive = by_server["blockserve"], by_server["naive"]
        print(f"{size:>4} {concurrency:>4} | {'ratio':<10} | "
              f"{ours.images_per_second / naive.images_per_second:6.2f}x | "
              f"{ours.percentile(50) / naive.percentile(50):6.2f}x | "
              f"{ours.percentile(95) / naive.percentile(95):6.2f}x |       |")
    if 1 in results:
        ours, naive = results[1]["blockserve"], results[1]["naive"]
        ratio = ours.percentile(50) / naive.percentile(50)
        print(f"{size}x{size}, a lone request (concurrency 1): goal (p50 <= {LONE_GOAL}x the "
              f"naive server's) {'met' if ratio <= LONE_GOAL else 'NOT met'}: {ratio:.2f}x, "
              f"p50 {ours.percentile(50):.3f}s vs {naive.percentile(50):.3f}s")
    top = max(results)
    if top > 1:
        ours, naive = results[top]["blockserve"], results[top]["naive"]
        throughput = ours.images_per_second / naive.images_per_second
        met = throughput >= 3 and ours.percentile(95) < naive.percentile(95)
        print(f"{size}x{size}, concurrency {top}: goal (>= 3x throughput, lower p95) "
              f"{'met' if met else 'NOT met'}: {throughput:.2f}x, p95 "
              f"{ours.percentile(95):.3f}s vs {naive.percentile(95):.3f}s")
    print()


def write_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from blocks.stable_diffusion.tiny_model import write_tiny_sd

    return write_tiny_sd(folder / "tiny-sd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48,
                        help="per server, size, concurrency and round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds per level; the median round counts")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int,
                        help="blockserve's BLOCKSERVE_MAX_BATCH_SIZE (default: its default)")
    parser.add_argument("--scheduling", choices=("step", "request"),
                        help="blockserve's BLOCKSERVE_SCHEDULING (default: its default, step)")
    parser.add_argument("--batch-window-ms", type=float,
                        help="blockserve's BLOCKSERVE_BATCH_WINDOW_MS (request scheduling)")
    parser.add_argument("--workers", type=int, default=1,
                        help="blockserve's BLOCKSERVE_WORKERS (batches at once)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model call (1: on a small shared machine, "
                             "more threads than free cores makes OpenMP stall)")
    parser.add_argument("--naive-threads", type=int,
                        help="the naive server's torch threads (default: --threads)")
    parser.add_argument("--warmup", type=int, default=4, help="requests per server and size")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="blockserve-bench-"))
    servers: list[Server] = []
    try:
        checkpoint = write_checkpoint(folder)
        models = folder / "models.yaml"
        sizes = ", ".join(f"{size}x{size}" for size in args.sizes)
        models.write_text(
            "models:\n  tiny-sd:\n    family: sd\n"
            f"    path: {checkpoint}\n"
            f"    defaults: {{steps: {args.steps}, guidance_scale: 7.5, "
            f"size: {args.sizes[0]}x{args.sizes[0]}}}\n"
            f"    sizes: [{sizes}]\n"
            f"    limits: {{max_steps: {max(args.steps, 50)}, max_n: 4}}\n")
        cores = args.workers * args.threads
        naive_threads = args.naive_threads or args.threads
        env = {**os.environ, "OMP_NUM_THREADS": str(naive_threads), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(ROOT)}
        # The engine gives each of its workers cores / workers threads.
        ours_env = {**env, "OMP_NUM_THREADS": str(cores), "BLOCKSERVE_WORKERS": str(args.workers),
                    "BLOCKSERVE_LOG_LEVEL": "warning",
                    "BLOCKSERVE_CACHE_DIR": str(folder / "cache"),
                    "BLOCKSERVE_QUEUE_SIZE": str(max(64, 2 * max(args.concurrency)))}
        for name, value in (("MAX_BATCH_SIZE", args.max_batch_size),
                            ("SCHEDULING", args.scheduling),
                            ("BATCH_WINDOW_MS", args.batch_window_ms)):
            if value is not None:
                ours_env[f"BLOCKSERVE_{name}"] = str(value)
        ours_port, naive_port = free_port(), free_port()
        blockserve = Path(sys.executable).with_name("blockserve")
        ours_cmd = ([str(blockserve)] if blockserve.exists()
                    else [sys.executable, "-m", "service.cli"])
        ours = start("blockserve", [*ours_cmd, "serve", "--models", str(models), "--port",
                                    str(ours_port)], ours_env, folder, ours_port)
        servers.append(ours)
        naive = start("naive", [sys.executable, str(ROOT / "bench/baselines/naive_server.py"),
                                str(checkpoint), "--port", str(naive_port)], env, folder,
                      naive_port)
        servers.append(naive)
        wait_ready(ours, "/readyz")
        wait_ready(naive, "/healthz")

        print(f"tiny SD, {args.steps} steps, guidance 7.5, {args.requests} requests x "
              f"{args.rounds} rounds per server and level; blockserve {args.workers} worker(s) "
              f"x {args.threads} torch thread(s), max batch {args.max_batch_size or 'default'}, "
              f"{args.scheduling or 'step'} scheduling"
              + ("" if args.batch_window_ms is None else f", window {args.batch_window_ms} ms")
              + f"; naive {naive_threads} torch thread(s)\n")
        for size in args.sizes:
            difference = same_seed_difference([ours, naive], size, args.steps)
            print(f"{size}x{size}: same-seed image, blockserve vs naive: max |diff| = "
                  f"{difference} (8-bit levels)")
            for server in (ours, naive):
                warm = LoadResult(server.name, size, 1)
                asyncio.run(run_round(server, size, args.steps, 1, args.warmup, warm))
            results: dict[int, dict[str, LoadResult]] = {}
            turn = 0
            for concurrency in args.concurrency:
                results[concurrency] = {name: LoadResult(name, size, concurrency)
                                        for name in ("blockserve", "naive")}
                for _ in range(args.rounds):
                    for server in ((ours, naive) if turn % 2 == 0 else (naive, ours)):
                        result = results[concurrency][server.name]
                        before = batch_totals(ours)
                        asyncio.run(run_round(server, size, args.steps, concurrency,
                                              args.requests, result))
                        if server is ours:
                            after = batch_totals(ours)
                            result.batch_sum += after[0] - before[0]
                            result.batch_count += after[1] - before[1]
                    turn += 1
            print_table(size, results)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
