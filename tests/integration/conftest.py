"""A live `blockserve serve` for the integration tests: a subprocess on a free loopback port,
serving a test models file, ready (`/readyz` 200) before any test talks to it, killed after.

The models: the weight-free `demo`, plus a tiny SD and a tiny FLUX.2 klein checkpoint (written
once, by the first server's `create_tiny`) wherever `blocks` has that family's blocks.
Three servers per session at most: one with API keys on (most tests), one with auth off, and
one for the engine tests (test hooks on, a small queue, long jobs allowed; demo and tiny SD).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai.types import ImageModel

API_KEY = "test-key-123"
READY_TIMEOUT_S = 180.0
MAX_BODY_BYTES = 1 << 20  # small, so the 413 tests send little

# Every model name OpenAI's SDK knows is an alias of the demo model, as a deployment would
# alias its own: clients that hard-code one (litellm, the SDK's examples) work unchanged.
OPENAI_MODEL_NAMES = typing.get_args(ImageModel)
DEMO_YAML = """
models:
  demo:
    family: demo
    defaults: {steps: 2, size: 32x32}
    sizes: [32x32, 64x64]
    limits: {max_steps: 8, max_n: 4, max_prompt_length: 200}
    aliases: [ALIASES]
""".replace("ALIASES", ", ".join(OPENAI_MODEL_NAMES))
TINY_SD_YAML = """
  tiny-sd:
    family: sd
    path: {tiny_sd_path}
    create_tiny: sd
    defaults: {{steps: 2, guidance_scale: 5.0, size: 32x32}}
    sizes: [32x32, 64x64]
    limits: {{max_steps: {max_steps}, max_n: 2, max_prompt_length: 200, max_guidance_scale: 10}}
"""

TINY_FLUX_YAML = """
  tiny-flux:
    family: flux2-klein
    path: {tiny_flux_path}
    create_tiny: flux2-klein
    defaults: {{steps: 2, size: 32x32}}
    sizes: [32x32, 64x64]
    limits: {{max_steps: 4, max_n: 2, max_prompt_length: 200}}
"""


def family_available(pipeline_class_name: str) -> bool:
    """Whether `blocks` has blocks for checkpoints naming this pipeline class."""
    from blocks.families import blocks_for_index
    from blocks.loading import CheckpointIndex

    try:
        blocks_for_index(CheckpointIndex("probe", pipeline_class_name, None))
    except ValueError:
        return False
    return True


SERVES_TINY_SD = family_available("StableDiffusionPipeline")
SERVES_TINY_FLUX = family_available("Flux2KleinPipeline")
needs_tiny_sd = pytest.mark.skipif(
    not SERVES_TINY_SD, reason="blocks has no Stable Diffusion family yet: no tiny-sd model"
)
needs_tiny_flux = pytest.mark.skipif(
    not SERVES_TINY_FLUX, reason="blocks has no FLUX.2 klein family yet: no tiny-flux model"
)


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str | None
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60.0,
                            **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_serve_app(args: dict) -> Iterator[str]:
    """`service.ray_placement.build_app(args)` on a fresh 2-CPU local Ray cluster (loopback),
    ready; yields its URL. Serve, the weight pool's registry and the cluster stop after."""
    import ray
    from ray import serve

    from deployments.weight_pool import shutdown_registry
    from service.ray_placement import build_app, init_local_ray

    port = free_port()
    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="blockserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the Ray router never became ready"
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        shutdown_registry()
        ray.shutdown()


def blockserve_command() -> list[str]:
    script = Path(sys.executable).with_name("blockserve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "service.cli"]


# `demo-solo` takes one image per forward: a running job fills its pool, so the next ones of
# its size queue (positions, 429s, disconnects while queued).
ENGINE_YAML = """
models:
  demo:
    family: demo
    defaults: {steps: 2, size: 32x32}
    sizes: [32x32, 64x64]
    limits: {max_steps: 200, max_n: 4, max_prompt_length: 200}
  demo-solo:
    family: demo
    defaults: {steps: 2, size: 32x32}
    sizes: [32x32, 64x64]
    limits: {max_steps: 200, max_n: 4, max_prompt_length: 200}
    max_batch_size: 1
"""
ENGINE_QUEUE_SIZE = 4
ENGINE_ENV = {
    "BLOCKSERVE_TEST_HOOKS": "true",  # [[fail]] and [[slow:Nms]] prompt markers
    "BLOCKSERVE_QUEUE_SIZE": str(ENGINE_QUEUE_SIZE),
    "BLOCKSERVE_MAX_BATCH_SIZE": "8",
}


def start_server(folder: Path, api_key: str | None, yaml_text: str | None = None,
                 extra_env: dict[str, str] | None = None, sd_max_steps: int = 4) -> LiveServer:
    folder.mkdir(parents=True, exist_ok=True)
    models_file = folder / "models.yaml"
    with_flux = yaml_text is None
    yaml_text = DEMO_YAML if yaml_text is None else yaml_text
    if SERVES_TINY_SD:
        yaml_text += TINY_SD_YAML.format(tiny_sd_path=folder.parent / "tiny-sd",
                                         max_steps=sd_max_steps)
    if SERVES_TINY_FLUX and with_flux:
        yaml_text += TINY_FLUX_YAML.format(tiny_flux_path=folder.parent / "tiny-flux")
    models_file.write_text(yaml_text)
    port = free_port()
    env = {
        **os.environ,
        "BLOCKSERVE_API_KEYS": api_key or "",
        "BLOCKSERVE_CACHE_DIR": str(folder / "cache"),
        "BLOCKSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "BLOCKSERVE_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",  # two cores, shared with pytest and the other server
        "HF_HUB_OFFLINE": "1",  # tiny checkpoints are local: never reach for a hub
        **(extra_env or {}),
    }
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*blockserve_command(), "serve", "--models", str(models_file),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", api_key, process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"blockserve serve exited with {process.returncode}:\n"
                               f"{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"blockserve serve not ready after {READY_TIMEOUT_S}s:\n{server.log()}")


def stop_server(server: LiveServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=15)


@pytest.fixture(scope="session")
def live_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("blockserve-live")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def server(live_root: Path) -> Iterator[LiveServer]:
    """The server with auth on (key `API_KEY`)."""
    live = start_server(live_root / "auth-on", API_KEY)
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def open_server(live_root: Path, server: LiveServer) -> Iterator[LiveServer]:
    """A second server with auth off (started after the first, so the tiny SD is written)."""
    live = start_server(live_root / "auth-off", None)
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def engine_server(live_root: Path) -> Iterator[LiveServer]:
    """Auth off, test hooks on, a queue of `ENGINE_QUEUE_SIZE`, demo jobs of up to 200 steps,
    tiny SD jobs of up to 50."""
    live = start_server(live_root / "engine", None, ENGINE_YAML, ENGINE_ENV, sd_max_steps=50)
    yield live
    stop_server(live)
