"""Flood: many clients at once against `blockserve serve` (or `serve --ray`), on loopback.

Checks back-pressure under a flood: with a small `BLOCKSERVE_QUEUE_SIZE` the server must
refuse what it can't queue (429 with Retry-After) rather than let latency grow without bound,
and in Ray mode a Router replica added by autoscaling must not take traffic before its models
are loaded (no 503 "model is still loading"). One server (a subprocess on a free 127.0.0.1
port, a tiny random-weight Stable Diffusion model in a temp folder; `--ray` starts a local Ray
cluster on loopback, with its temp folder there too); `--clients` clients each send
generation requests back to back for `--duration` seconds, pausing `--pause` seconds after a
refusal. Bounded: fixed time and client count, nothing leaves the machine.

Printed: answers by status and error code, latency (p50/p95/max) of the 200s and of the
refusals, refusals without Retry-After, answers carrying `x-request-id` more than once, and
in Ray mode how many times Serve scaled the Router up (from its controller's log).

    python bench/flood.py [--ray [--ray-config FILE]] [--queue-size 4] [--clients 200]
        [--duration 60] [--pause 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_throughput import free_port, start, wait_ready  # noqa: E402
from soak import MODELS_YAML  # noqa: E402  (tiny SD, 32x32, 2 steps)

READY_TIMEOUT_S = 400.0  # Ray on a loaded 2-core machine


class Tally:
    def __init__(self) -> None:
        self.by_status: collections.Counter[str] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.no_retry_after = 0
        self.double_ids = 0

    def add(self, response: httpx.Response | None, seconds: float, error: str = "") -> None:
        if response is None:
            self.by_status[error] += 1
            return
        status = response.status_code
        key = str(status)
        if status >= 400:
            try:
                key += f" {response.json()['error']['code']}"
            except Exception:  # not our error shape (Serve's proxy's own answer, say)
                key += " (not JSON)"
            if status in (429, 503) and "retry-after" not in response.headers:
                self.no_retry_after += 1
        self.by_status[key] += 1
        self.latency["200" if status == 200 else "refused" if status in (429, 503) else
                     "other"].append(seconds)
        if len(response.headers.get_list("x-request-id")) > 1:
            self.double_ids += 1


async def client(http: httpx.AsyncClient, index: int, end: float, pause: float,
                 tally: Tally) -> None:
    n = 0
    while time.monotonic() < end:
        body = {"prompt": f"flood {index} {n}", "seed": index * 1000 + n, "size": "32x32"}
        n += 1
        began = time.monotonic()
        try:
            response = await http.post("/v1/images/generations", json=body)
        except httpx.HTTPError as error:
            tally.add(None, time.monotonic() - began, type(error).__name__)
            await asyncio.sleep(pause)
            continue
        tally.add(response, time.monotonic() - began)
        if response.status_code != 200:
            await asyncio.sleep(pause)


async def flood(url: str, clients: int, duration: float, pause: float) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        end = time.monotonic() + duration
        await asyncio.gather(*(client(http, i, end, pause, tally) for i in range(clients)))
    return tally


def describe(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"n={len(values)} p50 {statistics.median(ordered):.2f}s p95 {p95:.2f}s "
            f"max {ordered[-1]:.2f}s")


def router_upscales(ray_dir: Path) -> int:
    count = 0
    for log in ray_dir.glob("**/logs/serve/controller_*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "Upscaling" in line and "Router" in line:
                count += 1
    return count


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="flood-", dir="/tmp") as tmp:
        folder = Path(tmp)
        models = folder / "models.yaml"
        models.write_text(MODELS_YAML.format(path=folder / "tiny-sd"))
        port = free_port()
        env = {**os.environ, "BLOCKSERVE_QUEUE_SIZE": str(args.queue_size),
               "BLOCKSERVE_API_KEYS": "", "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(folder)}
        command = [sys.executable, "-m", "service.cli", "serve", "--models", str(models),
                   "--port", str(port)]
        if args.ray:
            command += ["--ray", "--ray-num-cpus", "2"]
            if args.ray_config:
                command += ["--ray-config", str(args.ray_config.resolve())]
        server = start("flood", command, env, folder, port)
        try:
            import serve_throughput

            serve_throughput.READY_TIMEOUT_S = READY_TIMEOUT_S
            wait_ready(server, "/readyz")
            began = time.monotonic()
            tally = asyncio.run(flood(server.base_url, args.clients, args.duration, args.pause))
            took = time.monotonic() - began
            upscales = router_upscales(folder) if args.ray else None
        finally:
            server.stop()
        mode = "ray" if args.ray else "embedded"
        print(f"mode {mode}, BLOCKSERVE_QUEUE_SIZE={args.queue_size}, {args.clients} clients, "
              f"{args.duration:g}s of load (ended after {took:.1f}s), pause {args.pause:g}s "
              "after a refusal")
        for status, count in sorted(tally.by_status.items()):
            print(f"  {status}: {count}")
        print(f"latency 200: {describe(tally.latency['200'])}")
        print(f"latency 429/503: {describe(tally.latency['refused'])}")
        if tally.latency["other"]:
            print(f"latency other: {describe(tally.latency['other'])}")
        print(f"429/503 without Retry-After: {tally.no_retry_after}")
        print(f"answers with x-request-id more than once: {tally.double_ids}")
        if upscales is not None:
            print(f"Router scaled up: {upscales} time(s)")
        loading = sum(c for s, c in tally.by_status.items() if s.startswith("503 model_loading"))
        return 1 if loading or tally.double_ids or tally.no_retry_after else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray", action="store_true", help="blockserve serve --ray")
    parser.add_argument("--ray-config", type=Path,
                        help="with --ray: a Serve config (default deployments/serve_config.yaml)")
    parser.add_argument("--queue-size", type=int, default=4, help="BLOCKSERVE_QUEUE_SIZE")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--pause", type=float, default=0.25,
                        help="seconds a client waits after a refusal before its next request")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
