"""`blockserve serve --ray`: a local Ray cluster on loopback, the app deployed, HTTP served;
SIGTERM shuts Serve and the cluster down and the command exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install '.[ray]')")
httpx = pytest.importorskip("httpx")

from tests.integration.test_ray_serve import MODELS_YAML  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_ray_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(MODELS_YAML.format(path=tmp_path / "tiny-sd"))
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    script = Path(sys.executable).with_name("blockserve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    process = subprocess.Popen(
        [*command, "serve", "--ray", "--ray-num-cpus", "2", "--models", str(models_file),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "BLOCKSERVE_API_KEYS": ""},
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "never ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {"prompt": "a cli test", "seed": 1, "size": "32x32"}
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
