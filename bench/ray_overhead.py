"""Benchmark: what distributed mode (Ray Serve) costs against embedded mode, in one run.

One tiny random-weight Stable Diffusion checkpoint (`write_tiny_sd`, in a temp folder), served
two ways over HTTP on loopback, side by side in this process:

- embedded: `create_app(settings)` under uvicorn (the batching engine, every block in-process)
- ray: the same app as the Serve ingress, heavy blocks on TextEncoder/Denoiser/VAE
  deployments, on a local Ray cluster (`--num-cpus`, default 2)

Printed: latency at concurrency 1 (p50/p95 over `--requests`) and throughput at concurrency 8
(images/s), ray / embedded ratios; then the per-hop overhead: the median round trip of one
remote call carrying a latent-sized tensor to a deployment and back (`Denoiser.ping`), for
the tiny model's latent (1, 4, 8, 8) and a 512x512 SD latent (1, 4, 64, 64). One request
through the router makes four such hops (text encoder, denoiser, VAE decode, plus the HTTP
proxy → router hop). Goal: per-hop <= 5 ms median on loopback.

    python bench/ray_overhead.py [--requests 16] [--steps 2] [--num-cpus 2] [--hops 200]
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS_YAML = """
models:
  tiny-sd:
    family: sd
    path: {path}
    create_tiny: sd
    defaults: {{steps: {steps}, guidance_scale: 5.0, size: 32x32}}
    sizes: [32x32]
    limits: {{max_steps: 50, max_n: 2, max_prompt_length: 200, max_guidance_scale: 10}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} never became ready")


def one(url: str, seed: int) -> float:
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", timeout=300,
                          json={"prompt": f"bench {seed}", "seed": seed, "size": "32x32"})
    response.raise_for_status()
    return time.perf_counter() - start


def measure(url: str, requests: int) -> dict[str, float]:
    for seed in range(3):  # warm-up
        one(url, seed)
    latencies = sorted(one(url, 100 + i) for i in range(requests))
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: one(url, 1000 + i), range(requests * 2)))
    throughput = requests * 2 / (time.perf_counter() - start)
    return {"p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
            "images_per_s": throughput}


def start_embedded(models_file: Path) -> tuple[str, object]:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    port = free_port()
    settings = Settings.from_env(models_file=models_file, api_keys="")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    return f"http://127.0.0.1:{port}", server


def hop_ms(handle: object, shape: tuple[int, ...], hops: int) -> float:
    payload = torch.randn(shape)
    for _ in range(10):
        handle.ping.remote(payload).result()  # type: ignore[attr-defined]
    times = []
    for _ in range(hops):
        start = time.perf_counter()
        handle.ping.remote(payload).result()  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=2)
    parser.add_argument("--hops", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray
    from ray import serve

    from service.ray_placement import build_app, init_local_ray

    folder = Path(tempfile.mkdtemp(prefix="blockserve-ray-bench-"))
    models_file = folder / "models.yaml"
    models_file.write_text(MODELS_YAML.format(path=folder / "tiny-sd", steps=args.steps))

    embedded_url, server = start_embedded(models_file)
    wait_ready(embedded_url)
    embedded = measure(embedded_url, args.requests)
    server.should_exit = True  # type: ignore[attr-defined]

    init_local_ray(num_cpus=args.num_cpus, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models_file": str(models_file)}), name="blockserve",
                  route_prefix="/")
        ray_url = f"http://127.0.0.1:{port}"
        wait_ready(ray_url)
        distributed = measure(ray_url, args.requests)
        denoiser = serve.get_deployment_handle("Denoiser", app_name="blockserve")
        hops = {shape: hop_ms(denoiser, shape, args.hops)
                for shape in [(1, 4, 8, 8), (1, 4, 64, 64)]}
        metrics = httpx.get(f"{ray_url}/metrics", timeout=30).text
        forwards = [float(m.group(1)) for m in re.finditer(
            r'^blockserve_step_batch_size_(?:sum|count)\{model="tiny-sd"\} (\S+)$', metrics,
            re.M)]
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"tiny SD, 32x32, {args.steps} steps, Ray num_cpus={args.num_cpus}, "
          f"torch threads 1, {args.requests} requests per level")
    print(f"{'':24}{'embedded':>12}{'ray':>12}{'ray/embedded':>14}")
    for key, label in [("p50_ms", "latency c=1 p50 (ms)"), ("p95_ms", "latency c=1 p95 (ms)"),
                       ("images_per_s", "throughput c=8 (img/s)")]:
        print(f"{label:24}{embedded[key]:12.1f}{distributed[key]:12.1f}"
              f"{distributed[key] / embedded[key]:14.2f}")
    for shape, ms in hops.items():
        kib = torch.Size(shape).numel() * 4 / 1024
        print(f"per-hop round trip, latent {shape} ({kib:.0f} KiB): {ms:.2f} ms median "
              f"(goal <= 5 ms)")
    if len(forwards) == 2 and forwards[1]:
        print(f"Denoiser: {forwards[0] / forwards[1]:.2f} requests per forward on average "
              "(step-level batching)")


if __name__ == "__main__":
    main()
