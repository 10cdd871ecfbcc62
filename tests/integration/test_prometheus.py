"""The dashboard against a real Prometheus: Debian's `prometheus` scrapes a live `blockserve
serve` on loopback every second; after a few generations, every dashboard query over
blockserve's own metrics must return data through Prometheus' HTTP API. (Queries over Ray
Serve's ray_serve_* metrics need a Ray cluster and are left to the unit tests' name check.)
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import DEMO_YAML, LiveServer, free_port, start_server, stop_server
from tests.unit.k8s_manifests import concrete, dashboard_queries, metric_names

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (Debian: apt-get install "
    "prometheus; .ci/run installs it where apt is available)")
DATA_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def scraped_server(live_root: Path) -> Iterator[LiveServer]:
    live = start_server(live_root / "prometheus-target", None, DEMO_YAML)
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory,
               scraped_server: LiveServer) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    target = scraped_server.base_url.removeprefix("http://")
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: blockserve\n"
        "    metrics_path: /metrics\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready after 60s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _query(url: str, expression: str) -> list:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return body["data"]["result"]


def test_every_blockserve_dashboard_query_returns_data(prometheus, scraped_server):
    with scraped_server.client() as http:
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        for seed in range(3):
            for model in models:
                response = http.post("/v1/images/generations",
                                     json={"model": model, "prompt": "red", "seed": seed})
                assert response.status_code == 200, response.text
        # One request with step caching per model that has a method, for the caching panel.
        cached = 0
        for model in models:
            methods = http.get(f"/v1/models/{model}").json()["step_cache"]["methods"]
            if methods:
                response = http.post("/v1/images/generations", json={
                    "model": model, "prompt": "red", "step_cache": methods[0]})
                assert response.status_code == 200, response.text
                cached += 1
        edit = http.post("/v1/images/edits", data={"model": "demo", "prompt": "blue"},
                         files={"image": ("in.png", _png(), "image/png")})
        assert edit.status_code == 200, edit.text
        # One client error, so the errors panel has a series to show.
        bad = http.post("/v1/images/generations",
                        json={"model": "demo", "prompt": "red", "size": "48x48"})
        assert bad.status_code == 400, bad.text
        base64.b64decode(edit.json()["data"][0]["b64_json"])

    # Ray's own series and the weight pool's exist only in Ray mode (the pool's names are
    # checked against its collector in tests/unit/test_k8s_prometheus.py); step caching's once
    # a model with a caching method served a request (the demo family has none).
    skipped = ("ray_", "blockserve_pool_") + (() if cached else ("blockserve_step_cache_",))
    queries = [(title, concrete(expr)) for title, expr in dashboard_queries()
               if not any(name.startswith(skipped) for name in metric_names(expr))]
    assert len(queries) >= 10
    missing = {f"{title}: {expr}": expr for title, expr in queries}
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while missing and time.monotonic() < deadline:
        missing = {key: expr for key, expr in missing.items() if not _query(prometheus, expr)}
        if missing:
            time.sleep(1)
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)
    up = _query(prometheus, 'up{job="blockserve"}')
    assert [float(sample["value"][1]) for sample in up] == [1.0]
