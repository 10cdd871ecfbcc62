"""Soak: `blockserve serve` under mixed normal and hostile load for a fixed time, on loopback.

One server (a subprocess on a free 127.0.0.1 port, API keys on, a tiny random-weight Stable
Diffusion model written to a temp folder), `--normal` clients making real requests
(generations, edits, background jobs followed to the end, url images fetched back, model
listings) and `--hostile` clients cycling through attacks (integers of 5000 digits, JSON
nested 100000 deep, image bombs: 1x16000000 and 16-bit 4096² RGBA PNGs, many-frame GIFs; bad
keys, oversized and stalled bodies, clients that leave mid-upload, slowloris headers, CL + TE,
junk Last-Event-IDs, unknown routes). Bounded: a fixed duration and client count, nothing
leaves the machine. `/healthz` is probed from another process throughout
(`tests/integration/health_watch.py`); the server's RSS is sampled every 50 ms.

Printed: requests by status (normal and hostile apart), 5xx answers (as clients saw them and
as the server counted them; goal 0), peak RSS growth over the idle, warmed-up server,
`/healthz` worst latency (goal <= 1 s), and RSS once the load has settled vs before (goal
<= 1.2x).

    python bench/soak.py [--duration 60] [--normal 4] [--hostile 4] [--read-timeout 5]
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import itertools
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_throughput import Server, free_port, start, wait_ready  # noqa: E402

from tests.integration.health_watch import HealthWatch  # noqa: E402
from tests.integration.hostile_kit import BIG, counted, png, png_claiming, scrape  # noqa: E402

API_KEY = "soak-key"
MODELS_YAML = """
models:
  tiny-sd:
    family: sd
    path: {path}
    create_tiny: sd
    defaults: {{steps: 2, guidance_scale: 5.0, size: 32x32}}
    sizes: [32x32, 64x64]
    limits: {{max_steps: 4, max_n: 2, max_prompt_length: 200}}
"""
AUTH = {"Authorization": f"Bearer {API_KEY}"}
Outcome = str  # an HTTP status, or what happened to the connection ("closed", "reset")


# -- normal clients ---------------------------------------------------------------------------


def normal_requests(client: httpx.Client, index: int) -> list[Outcome]:
    """One round of what a well-behaved client does; the statuses it got."""
    body = {"prompt": f"a red circle {index}", "seed": index, "size": "32x32"}
    kind = index % 5
    if kind == 0:
        return [str(client.post("/v1/images/generations", json=body).status_code)]
    if kind == 1:
        response = client.post("/v1/images/edits", data={"prompt": "blue", "seed": str(index)},
                               files={"image": ("in.png", png((32, 32)), "image/png")})
        return [str(response.status_code)]
    if kind == 2:
        created = client.post("/v1/jobs", json=body)
        outcomes = [str(created.status_code)]
        if created.status_code == 202:
            job = f"/v1/jobs/{created.json()['id']}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = client.get(job)
                if status.status_code != 200 or status.json()["status"] not in ("queued",
                                                                                  "running"):
                    outcomes.append(str(status.status_code))
                    break
                time.sleep(0.05)
        return outcomes
    if kind == 3:
        made = client.post("/v1/images/generations", json={**body, "response_format": "url"})
        outcomes = [str(made.status_code)]
        if made.status_code == 200:
            outcomes.append(str(client.get(made.json()["data"][0]["url"]).status_code))
        return outcomes
    return [str(client.get("/v1/models").status_code)]


# -- hostile clients ------------------------------------------------------------------------


def raw(port: int, data: bytes, read: bool = True, timeout_s: float = 60) -> Outcome:
    """Send `data` on a fresh connection; the status line's code, or what became of it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(data)
            if not read:
                return "left"
            reply = sock.recv(64)
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "timeout"
    return reply.split(b" ")[1].decode() if reply.startswith(b"HTTP/1.1 ") else "closed"


def attacks(port: int) -> list[tuple[str, Callable[[httpx.Client], Outcome]]]:
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            f"{API_KEY}\r\nContent-Type: application/json\r\n").encode()
    bomb16 = png_claiming(4096, 4096, bit_depth=16, colour=6)
    long_png = png_claiming(1, 16_000_000)
    frames = [Image.new("L", (256, 256), i) for i in range(100)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])

    def post_json(text: str) -> Callable[[httpx.Client], Outcome]:
        return lambda c: str(c.post("/v1/images/generations", content=text.encode(),
                                    headers={"content-type": "application/json"}).status_code)

    def edit(data: bytes) -> Callable[[httpx.Client], Outcome]:
        return lambda c: str(c.post("/v1/images/edits", data={"prompt": "x"},
                                    files={"image": ("a.png", data, "image/png")}).status_code)

    def slowloris(_: httpx.Client) -> Outcome:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")
                while True:
                    sock.sendall(b"X")
                    time.sleep(0.5)
        except (ConnectionResetError, BrokenPipeError):
            return "closed"

    def bad_last_event_id(c: httpx.Client) -> Outcome:
        job = c.post("/v1/jobs", json={"prompt": "x"})
        if job.status_code != 202:
            return str(job.status_code)
        return str(c.get(f"/v1/jobs/{job.json()['id']}/events",
                         headers={"Last-Event-ID": "²".encode()}).status_code)

    return [
        ("integer of 5000 digits", post_json(f'{{"prompt": "x", "seed": {BIG}}}')),
        ("JSON nested 100000 deep", post_json("[" * 100_000)),
        ("1x16000000 PNG", edit(long_png)),
        ("16-bit 4096² RGBA PNG", edit(bomb16)),
        ("GIF of 100 frames", edit(gif.getvalue())),
        ("base64 that is not an image", lambda c: str(c.post("/v1/images/edits", json={
            "prompt": "x", "image": base64.b64encode(b"hello").decode()}).status_code)),
        ("wrong key", lambda c: str(c.get("/v1/models", headers={
            "Authorization": "Bearer nope"}).status_code)),
        ("oversized body", lambda _: raw(port, head + b"Content-Length: 999999999\r\n\r\n")),
        ("stalled body", lambda _: raw(port, head + b"Content-Length: 100\r\n\r\n{\"a")),
        ("left mid-upload", lambda _: raw(port, head + b"Content-Length: 100000\r\n\r\n{\"pr",
                                          read=False)),
        ("slowloris", slowloris),
        ("CL + TE", lambda _: raw(port, head + b"Content-Length: 4\r\nTransfer-Encoding: "
                                  b"chunked\r\n\r\n0\r\n\r\n")),
        ("junk Last-Event-ID", bad_last_event_id),
        ("unknown route", lambda c: str(c.get("/v1/admin").status_code)),
    ]


# -- the run --------------------------------------------------------------------------------


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="blockserve-soak-"))
    models = folder / "models.yaml"
    models.write_text(MODELS_YAML.format(path=folder / "tiny-sd"))
    port = free_port()
    env = {**os.environ, "BLOCKSERVE_API_KEYS": API_KEY, "BLOCKSERVE_LOG_LEVEL": "warning",
           "BLOCKSERVE_CACHE_DIR": str(folder / "cache"), "HF_HUB_OFFLINE": "1",
           "BLOCKSERVE_READ_TIMEOUT_SECONDS": str(args.read_timeout),
           "OMP_NUM_THREADS": "1"}
    server = start("blockserve", [sys.executable, "-m", "service.cli", "serve", "--models",
                                  str(models), "--host", "127.0.0.1", "--port", str(port)],
                   env, folder, port)
    try:
        wait_ready(server, "/readyz")
        return soak(server, port, args)
    finally:
        server.stop()


def soak(server: Server, port: int, args: argparse.Namespace) -> int:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120) as client:
        for index in range(5):  # warm up: every normal kind once
            normal_requests(client, index)
    time.sleep(2)
    before = psutil.Process(server.process.pid).memory_info().rss
    sampler = RssSampler(server.process.pid)
    watch = HealthWatch(server.base_url)
    normal: collections.Counter[str] = collections.Counter()
    hostile: collections.Counter[str] = collections.Counter()
    by_attack: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    lock = threading.Lock()
    menu = attacks(port)
    counter = itertools.count()
    stop_at = 0.0  # set when the clients start

    def normal_client(worker: int) -> None:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            index = worker * 1_000_000
            while time.monotonic() < stop_at:
                try:
                    outcomes = normal_requests(client, index)
                except httpx.HTTPError as error:
                    outcomes = [type(error).__name__]
                with lock:
                    normal.update(outcomes)
                index += 1

    def hostile_client() -> None:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            while time.monotonic() < stop_at:
                name, attack = menu[next(counter) % len(menu)]
                try:
                    outcome = attack(client)
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                with lock:
                    hostile[outcome] += 1
                    by_attack[name][outcome] += 1

    with watch.window() as window:
        stop_at = time.monotonic() + args.duration
        threads = ([threading.Thread(target=normal_client, args=(i,))
                    for i in range(args.normal)]
                   + [threading.Thread(target=hostile_client) for _ in range(args.hostile)])
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    window.collect()
    sampler.stop()
    time.sleep(args.settle)
    after = psutil.Process(server.process.pid).memory_info().rss
    watch.close()
    samples = scrape(server)
    server_5xx = (counted(samples, "blockserve_http_requests_total", status="5xx")
                  - counted(samples, "blockserve_http_requests_total", route="/readyz",
                            status="503"))
    client_5xx = sum(n for status, n in (normal + hostile).items() if status.startswith("5"))
    probes = window.probes or window.set_aside
    worst = max((p.seconds for p in window.probes), default=float("nan"))
    failed_probes = sum(p.status != 200 for p in probes)

    mib = 2**20
    print(f"soak: {args.duration:g}s, {args.normal} normal + {args.hostile} hostile clients, "
          f"read timeout {args.read_timeout:g}s, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"normal requests by status:  {dict(sorted(normal.items()))}")
    print(f"hostile requests by status: {dict(sorted(hostile.items()))}")
    for name, outcomes in by_attack.items():
        print(f"  {name:28s} {dict(sorted(outcomes.items()))}")
    print(f"5xx answers: {client_5xx} seen by clients, {server_5xx:g} counted by the server "
          f"(goal 0)")
    print(f"peak RSS growth: {(sampler.peak - before) / mib:.0f} MiB over {before / mib:.0f} "
          "MiB idle")
    print(f"/healthz worst latency: {worst:.3f}s over {len(window.probes)} probes "
          f"({len(window.set_aside)} set aside: the probe itself was starved; "
          f"{failed_probes} not 200) (goal <= 1 s)")
    print(f"RSS after settling {args.settle:g}s: {after / mib:.0f} MiB vs {before / mib:.0f} "
          f"MiB before = {after / before:.2f}x (goal <= 1.2x)")
    ok = (client_5xx == 0 and server_5xx == 0 and worst <= 1.0 and failed_probes == 0
          and after / before <= 1.2)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--normal", type=int, default=4, help="well-behaved clients")
    parser.add_argument("--hostile", type=int, default=4, help="attacking clients")
    parser.add_argument("--read-timeout", type=float, default=5.0,
                        help="the server's BLOCKSERVE_READ_TIMEOUT_SECONDS")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="idle seconds before the final RSS")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
