"""The serving engine on a live server: jobs and their events, cancellation, batching that
changes no image, back-pressure, disconnects, failure isolation, and streaming.

The server (`engine_server`) has test hooks on, so a prompt can make its pipeline call slow
(`[[slow:50ms]]` per step) or fail (`[[fail]]`). Most tests first start a *blocker*: a slow
64x64 job that keeps the engine busy, so the requests under test queue up behind it (32x32,
another batch key) and are all in the queue when the blocker is cancelled — which makes "these
run as one batch" deterministic instead of a matter of timing.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from openai import APIError as OpenAIAPIError
from openai import OpenAI
from PIL import Image

from tests.integration.conftest import ENGINE_QUEUE_SIZE, LiveServer, needs_tiny_sd

GENERATIONS = "/v1/images/generations"


# -- helpers -----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when absent)."""
    text = httpx.get(f"{server.base_url}/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "")
    match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def events(response: httpx.Response) -> Iterator[tuple[str, int | None, dict[str, Any]]]:
    """(event, id, data) of a server-sent event stream, as they arrive."""
    name, event_id, data = None, None, []
    for line in response.iter_lines():
        if not line:
            if name is not None:
                yield name, event_id, json.loads("\n".join(data))
            name, event_id, data = None, None, []
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("id: "):
            event_id = int(line[len("id: "):])
        elif line.startswith("data: "):
            data.append(line[len("data: "):])


def decode_png(b64_json: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    image.load()
    return image


def start_blocker(client: httpx.Client) -> str:
    """A slow 64x64 job, running when this returns: the engine is busy until it is cancelled."""
    response = client.post("/v1/jobs", json={"model": "demo", "prompt": "black [[slow:50ms]]",
                                             "size": "64x64", "num_inference_steps": 200})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running",
               what="the blocker to start")
    return job_id


def generate(server: LiveServer, body: dict[str, Any], timeout: float = 60.0) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=timeout) as client:
        return client.post(GENERATIONS, json=body)


def queued_behind_blocker(server: LiveServer,
                          bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send `bodies` concurrently while a blocker runs, release them together, collect them."""
    with server.client() as client, ThreadPoolExecutor(len(bodies)) as pool:
        blocker = start_blocker(client)
        futures: list[Future[httpx.Response]] = [pool.submit(generate, server, body)
                                                 for body in bodies]
        wait_until(lambda: metric(server, "blockserve_queue_depth") == len(bodies),
                   what=f"{len(bodies)} queued jobs")
        assert client.delete(f"/v1/jobs/{blocker}").status_code == 200
        return [future.result() for future in futures]


def batched_images(server: LiveServer) -> float:
    """Pipeline calls so far that made more than one image."""
    total = metric(server, "blockserve_batch_size_count", model="demo")
    single = metric(server, "blockserve_batch_size_bucket", model="demo", le="1.0")
    return total - single


# -- jobs and events ---------------------------------------------------------------------------


def test_job_events_arrive_in_order_and_end_with_completed(engine_server: LiveServer) -> None:
    body = {"model": "demo", "prompt": "red [[slow:20ms]]", "num_inference_steps": 6,
            "seed": 11, "preview": True}
    with engine_server.client() as client:
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["status"] in ("queued", "running") and job["total_steps"] == 6
        assert created.headers["location"].endswith(f"/v1/jobs/{job['id']}")
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            received = list(events(response))
        status = client.get(f"/v1/jobs/{job['id']}").json()
    names = [name for name, _, _ in received]
    assert names[:2] == ["queued", "started"], names
    assert names[-1] == "completed" and names.count("completed") == 1
    assert set(names[2:-1]) == {"progress"}, names
    ids = [event_id for _, event_id, _ in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    steps = [data["step"] for name, _, data in received if name == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    progress = [data for name, _, data in received if name == "progress"][-1]
    assert progress["total_steps"] == 6
    preview = decode_png(progress["previews"][0])  # the demo denoises pixels: full size
    assert preview.size == (32, 32) and preview.mode == "RGB"
    result = received[-1][2]["result"]
    assert status["status"] == "succeeded" and status["step"] == 6
    assert status["result"]["data"] == result["data"]
    alone = generate(engine_server, {k: v for k, v in body.items() if k != "preview"})
    assert alone.json()["data"][0]["b64_json"] == result["data"][0]["b64_json"]


def test_delete_stops_a_running_job_within_two_steps(engine_server: LiveServer) -> None:
    before = metric(engine_server, "blockserve_cancellations_total", model="demo",
                    stage="running")
    with engine_server.client() as client:
        job_id = client.post("/v1/jobs", json={
            "model": "demo", "prompt": "blue [[slow:50ms]]", "num_inference_steps": 100,
        }).json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            step_at_delete = None
            for name, _, data in events(response):
                if name == "progress" and data["step"] >= 3 and step_at_delete is None:
                    cancelled = client.delete(f"/v1/jobs/{job_id}")
                    assert cancelled.status_code == 200
                    assert cancelled.json()["status"] in ("running", "cancelled")
                    step_at_delete = cancelled.json()["step"]  # the server's, not our reading
                if name in ("completed", "failed", "cancelled"):
                    final = (name, data)
                    break
        status = client.get(f"/v1/jobs/{job_id}").json()
    assert final[0] == "cancelled", final
    assert final[1]["error"]["code"] == "cancelled"
    assert step_at_delete is not None
    assert final[1]["step"] <= step_at_delete + 2, (step_at_delete, final[1]["step"])
    assert status["status"] == "cancelled" and status["step"] == final[1]["step"]
    assert metric(engine_server, "blockserve_cancellations_total", model="demo",
                  stage="running") == before + 1


def test_unknown_jobs_are_404(engine_server: LiveServer) -> None:
    with engine_server.client() as client:
        for method, path in (("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events"),
                             ("DELETE", "/v1/jobs/nope")):
            response = client.request(method, path)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "job_not_found"


# -- batching ----------------------------------------------------------------------------------


def test_batched_and_alone_give_identical_pixels(engine_server: LiveServer) -> None:
    bodies = [{"model": "demo", "prompt": f"{colour} sky", "seed": seed, "n": n}
              for colour, seed, n in (("red", 1, 1), ("green", 2, 2), ("blue", 3, 1),
                                      ("a purple cat", 4, 1))]
    batches_before = batched_images(engine_server)
    batched = queued_behind_blocker(engine_server, bodies)
    assert batched_images(engine_server) > batches_before  # a pipeline call made several
    for body, response in zip(bodies, batched, strict=True):
        assert response.status_code == 200, response.text
        alone = generate(engine_server, body)
        assert [d["b64_json"] for d in response.json()["data"]] == \
            [d["b64_json"] for d in alone.json()["data"]]


@needs_tiny_sd
def test_tiny_sd_batched_and_alone_give_identical_pixels(engine_server: LiveServer) -> None:
    # The same noise and batch-invariant CPU kernels (see service/batch.py): the same bytes.
    bodies = [{"model": "tiny-sd", "prompt": prompt, "seed": seed}
              for prompt, seed in (("a cat", 1), ("a dog", 2), ("a tree", 3))]
    batched = queued_behind_blocker(engine_server, bodies)
    assert metric(engine_server, "blockserve_batch_size_count", model="tiny-sd") > \
        metric(engine_server, "blockserve_batch_size_bucket", model="tiny-sd", le="1.0")
    for body, response in zip(bodies, batched, strict=True):
        assert response.status_code == 200, response.text
        alone = generate(engine_server, body).json()["data"][0]["b64_json"]
        assert response.json()["data"][0]["b64_json"] == alone


def test_a_failing_request_leaves_its_batch_mates_correct(engine_server: LiveServer) -> None:
    bodies = [{"model": "demo", "prompt": prompt, "seed": seed}
              for prompt, seed in (("red", 5), ("green [[fail]]", 6), ("blue", 7))]
    batches_before = batched_images(engine_server)
    responses = queued_behind_blocker(engine_server, bodies)
    assert batched_images(engine_server) > batches_before  # they did try as one batch
    assert responses[1].status_code == 500
    assert responses[1].json()["error"]["code"] == "internal_error"
    for index in (0, 2):
        assert responses[index].status_code == 200, responses[index].text
        alone = generate(engine_server, bodies[index])
        assert responses[index].json()["data"] == alone.json()["data"]


# -- back-pressure and disconnects -------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after(engine_server: LiveServer) -> None:
    with engine_server.client() as client:
        blocker = start_blocker(client)
        queued = []
        for seed in range(ENGINE_QUEUE_SIZE):
            response = client.post("/v1/jobs", json={"model": "demo", "prompt": "red",
                                                     "seed": seed})
            assert response.status_code == 202, response.text
            queued.append(response.json()["id"])
        assert client.get(f"/v1/jobs/{queued[-1]}").json()["position"] == \
            ENGINE_QUEUE_SIZE - 1
        full = client.post(GENERATIONS, json={"model": "demo", "prompt": "red"})
        full_job = client.post("/v1/jobs", json={"model": "demo", "prompt": "red"})
        for response in (full, full_job):
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "queue_full"
        for job_id in queued:  # a queued job leaves the queue at once
            assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        assert metric(engine_server, "blockserve_queue_depth") == 0
        client.delete(f"/v1/jobs/{blocker}")
        assert client.post(GENERATIONS, json={"model": "demo", "prompt": "red"}).status_code \
            == 200


def test_a_disconnecting_client_frees_its_slot(engine_server: LiveServer) -> None:
    queued_before = metric(engine_server, "blockserve_cancellations_total", model="demo",
                           stage="queued")
    with engine_server.client() as client:
        blocker = start_blocker(client)
        # Queued behind the blocker when its client gives up: its slot is freed.
        with pytest.raises(httpx.ReadTimeout):
            generate(engine_server, {"model": "demo", "prompt": "red"}, timeout=0.5)
        wait_until(lambda: metric(engine_server, "blockserve_queue_depth") == 0,
                   what="the queue to empty")
        assert metric(engine_server, "blockserve_cancellations_total", model="demo",
                      stage="queued") == queued_before + 1
        client.delete(f"/v1/jobs/{blocker}")
        # Running when its client gives up: stopped at its next step.
        wait_until(lambda: metric(engine_server, "blockserve_inflight_jobs") == 0)
        running_before = metric(engine_server, "blockserve_cancellations_total", model="demo",
                                stage="running")
        with pytest.raises(httpx.ReadTimeout):
            generate(engine_server, {"model": "demo", "prompt": "red [[slow:50ms]]",
                                     "num_inference_steps": 100}, timeout=0.5)
        wait_until(lambda: metric(engine_server, "blockserve_cancellations_total",
                                  model="demo", stage="running") == running_before + 1,
                   what="the running job to be cancelled")
        wait_until(lambda: metric(engine_server, "blockserve_inflight_jobs") == 0)
        assert client.post(GENERATIONS, json={"model": "demo", "prompt": "red"}).status_code \
            == 200


# -- streaming ---------------------------------------------------------------------------------


def test_streaming_generation_with_the_openai_client(engine_server: LiveServer) -> None:
    client = OpenAI(base_url=f"{engine_server.base_url}/v1", api_key="unused", max_retries=0)
    extra = {"seed": 21, "num_inference_steps": 6}
    stream = client.images.generate(model="demo", prompt="orange [[slow:10ms]]", stream=True,
                                    partial_images=2, extra_body=extra)
    received = list(stream)
    assert [event.type for event in received] == [
        "image_generation.partial_image", "image_generation.partial_image",
        "image_generation.completed"]
    assert [event.partial_image_index for event in received[:2]] == [0, 1]
    completed = received[-1]
    assert completed.size == "32x32" and completed.output_format == "png"
    assert completed.usage.output_tokens == 1 and completed.usage.input_tokens >= 1
    for event in received:
        assert decode_png(event.b64_json).size == (32, 32)
    plain = client.images.generate(model="demo", prompt="orange [[slow:10ms]]",
                                   extra_body=extra)
    assert completed.b64_json == plain.data[0].b64_json


def test_streaming_failure_is_an_error_event(engine_server: LiveServer) -> None:
    with engine_server.client() as client, client.stream("POST", GENERATIONS, json={
            "model": "demo", "prompt": "red [[fail]]", "stream": True}) as response:
        assert response.status_code == 200
        received = list(events(response))
    assert [name for name, _, _ in received] == ["error"]
    assert received[0][2]["error"]["code"] == "internal_error"
    client = OpenAI(base_url=f"{engine_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(OpenAIAPIError):
        list(client.images.generate(model="demo", prompt="red [[fail]]", stream=True))


def test_engine_metrics_are_exported(engine_server: LiveServer) -> None:
    text = httpx.get(f"{engine_server.base_url}/metrics").text
    for name in ("blockserve_queue_depth", "blockserve_inflight_jobs",
                 "blockserve_queue_wait_seconds_bucket", "blockserve_batch_size_bucket",
                 "blockserve_cancellations_total", "blockserve_timeouts_total"):
        assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text, name
