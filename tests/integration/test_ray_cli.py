"""`blockserve serve --ray`: a local Ray cluster with every port on loopback, the app deployed,
HTTP served, hostile input handled as in embedded mode; SIGTERM shuts Serve and the cluster
down and the command exits.

One `blockserve serve --ray` for the module (Ray takes ~30 s to start); the SIGTERM test
stops it, so it runs last. The hostile subset is what differs in Ray mode: the request goes
through Ray Serve's proxy to the Router replica (issue 22).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install '.[ray]')")
httpx = pytest.importorskip("httpx")

from tests.integration.conftest import TINY_SD_YAML, free_port  # noqa: E402
from tests.integration.health_watch import HealthWatch  # noqa: E402
from tests.integration.hostile_kit import BIG, counted, png, png_claiming, scrape  # noqa: E402

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
READ_TIMEOUT_S = 3


@dataclass
class RayCli:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    readiness: list[tuple[int, str]] = field(default_factory=list)  # every /readyz answer

    @property
    def base_url(self) -> str:  # what test_hostile's helpers call it
        return self.url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture(scope="module")
def ray_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCli]:
    tmp_path = tmp_path_factory.mktemp("ray-cli")
    models_file = tmp_path / "models.yaml"
    # One small model (the live server's tiny SD entry): these tests are about the command (its
    # ports, readiness and hostile clients), not about what the models draw (test_ray_serve).
    models_file.write_text("models:" + TINY_SD_YAML.format(tiny_sd_path=tmp_path / "tiny-sd",
                                                           max_steps=50))
    port = free_port()
    log_path = tmp_path / "serve.log"
    script = Path(sys.executable).with_name("blockserve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    env = {**os.environ, "BLOCKSERVE_API_KEYS": "",
           "BLOCKSERVE_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT_S)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "serve", "--ray", "--ray-num-cpus", "2", "--models", str(models_file),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    cli = RayCli(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine starts Ray slowly
        while True:
            assert process.poll() is None, cli.log()[-3000:]
            assert time.monotonic() < deadline, "never ready"
            try:
                response = httpx.get(f"{cli.url}/readyz", timeout=5)
                cli.readiness.append((response.status_code, response.text))
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield cli
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def watch(ray_cli: RayCli) -> Iterator[HealthWatch]:
    health = HealthWatch(ray_cli.url)
    yield health
    health.close()


def _ss() -> str:
    """`ss`'s path, installing Debian's iproute2 first where it is missing (best effort, as
    .ci/run does); skips the test when that is not possible."""
    found = shutil.which("ss")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "iproute2"], capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("ss")
    if found is None:
        pytest.skip("`ss` is not installed and iproute2 could not be installed here "
                    "(Debian: apt-get install iproute2)")
    return found


def test_every_port_the_command_opened_listens_on_loopback_only(ray_cli: RayCli) -> None:
    """GCS, raylet, workers, replicas, agents, the Serve proxy: `ss -ltnp` lists each
    listening socket with its process; those of the processes `blockserve serve --ray`
    started must all be on 127.0.0.1 (or ::1, or 127.0.0.1 mapped to IPv6)."""
    ss = _ss()
    ours = {ray_cli.process.pid} | {child.pid for child in
                                    psutil.Process(ray_cli.process.pid).children(recursive=True)}
    listing = subprocess.run([ss, "-ltnpH"], capture_output=True, text=True, check=True).stdout
    listeners = []
    for line in listing.splitlines():
        pids = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if pids & ours:
            listeners.append((line.split()[3], sorted(re.findall(r'\("([^"]+)"', line))))
    assert len(listeners) >= 5, listing  # the proxy, GCS, raylet, a worker, an agent at least
    loopback = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")
    # Ray Serve 2.60's replicas open their inter-deployment gRPC server on "[::]:0", hard-coded
    # (ray/serve/_private/replica.py, `_on_initialized`): no option moves it to loopback, so
    # it is the one exception, and the README says to firewall a Ray machine for it.
    exposed = [(address, names) for address, names in listeners
               if not loopback.match(address) and names != ["ray::ServeRepli"]]
    assert not exposed, f"listening beyond loopback: {exposed}"
    port = ray_cli.url.rsplit(":", 1)[1]
    assert any(address.endswith(f":{port}") for address, _ in listeners)  # the proxy is ours


def test_the_router_was_never_ready_without_its_models(ray_cli: RayCli) -> None:
    """The Router replica starts only once its models are loaded: no answer while starting
    said a model was still loading (a replica added by autoscaling starts the same way)."""
    assert ray_cli.readiness[-1][0] == 200
    for status, text in ray_cli.readiness:
        assert "loading" not in text and "pending" not in text, (status, text)


def test_hostile_requests_get_the_same_answers_in_ray_mode(ray_cli: RayCli,
                                                            watch: HealthWatch) -> None:
    before = scrape(ray_cli)
    with watch.window() as window, httpx.Client(base_url=ray_cli.url, timeout=120) as client:
        big = client.post(GENERATIONS, content=f'{{"prompt": "x", "n": {BIG}}}'.encode(),
                          headers={"content-type": "application/json"})
        bomb = client.post(EDITS, files={"image": ("a.png", png_claiming(1, 16_000_000),
                                                   "image/png")}, data={"prompt": "x"})
        gif = client.post(EDITS, files={"image": ("a.gif", png(fmt="GIF"), "image/gif")},
                          data={"prompt": "x"})
        job = client.post("/v1/jobs", json={"prompt": "x", "seed": 1})
        events = client.get(f"/v1/jobs/{job.json()['id']}/events",
                            headers={"Last-Event-ID": "²".encode()})
        reflected = client.post(GENERATIONS, headers={"Host": "evil.example"},
                                json={"prompt": "x", "seed": 1, "response_format": "url"})
    for response, param in ((big, "n"), (bomb, "image"), (gif, "image"),
                            (events, "Last-Event-ID")):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert param in response.json()["error"]["message"]
    for response in (big, bomb, events, reflected):
        assert len(response.headers.get_list("x-request-id")) == 1  # not the proxy's and ours
    assert reflected.status_code == 200, reflected.text
    url = reflected.json()["data"][0]["url"]
    assert url.startswith(f"{ray_cli.url}/v1/files/") and "evil" not in url
    window.assert_healthy()
    after = scrape(ray_cli)
    assert counted(after, "blockserve_requests_total", status="400") == \
        counted(before, "blockserve_requests_total", status="400") + 3


def test_aborted_and_stalled_uploads_through_the_proxy(ray_cli: RayCli,
                                                       watch: HealthWatch) -> None:
    """Ten clients hang up mid-body (never a 5xx); one stalls (408 from the app, after the
    read timeout)."""
    before = scrape(ray_cli)
    port = int(ray_cli.url.rsplit(":", 1)[1])
    head = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: 100000\r\n\r\n{\"prompt\": \"aaaa")

    def leave() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)
            time.sleep(0.3)

    stalled: list[bytes] = []

    def stall() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S + 30) as s:
            s.sendall(head)
            stalled.append(s.recv(65536))

    with watch.window() as window:
        threads = [threading.Thread(target=leave) for _ in range(10)]
        threads.append(threading.Thread(target=stall))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert stalled and stalled[0].startswith(b"HTTP/1.1 408 "), stalled
    # Serve's proxy sees each hang-up and cancels the Router's task (the app gets a
    # CancelledError, or an `http.disconnect` if it was reading just then); a request it had
    # not yet handed to the Router never reaches the app. Either way: a 499, never a 5xx.
    after = scrape(ray_cli)
    assert counted(after, "blockserve_requests_total", status="499") <= \
        counted(before, "blockserve_requests_total", status="499") + 10
    window.assert_healthy()
    assert counted(after, "blockserve_requests_total", status="5xx") == 0
    assert counted(after, "blockserve_http_requests_total", status="5xx") == \
        counted(before, "blockserve_http_requests_total", status="5xx")
    assert "Traceback" not in ray_cli.log()


def test_serve_ray_serves_and_stops_cleanly_on_sigterm(ray_cli: RayCli) -> None:
    body = {"prompt": "a cli test", "seed": 1, "size": "32x32"}
    response = httpx.post(f"{ray_cli.url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "Traceback" not in ray_cli.log()
    ray_cli.process.send_signal(signal.SIGTERM)
    assert ray_cli.process.wait(timeout=60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{ray_cli.url}/healthz", timeout=2)
