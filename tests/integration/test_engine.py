"""The serving engine on a live server: jobs and their events, cancellation, step-level batching
that changes no image, back-pressure, disconnects, failure isolation, and streaming.

The server (`engine_server`) has test hooks on, so a prompt can make its steps slow
(`[[slow:50ms]]` per step) or fail (`[[fail]]`). `demo-solo` takes one image per forward, so
a running *blocker* job (slow, many steps) fills its pool and the requests under test queue
behind it, in order, until it is cancelled. The step-batching scenario shared with Ray mode is
`tests/integration/step_batching.py`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from openai import APIError as OpenAIAPIError
from openai import OpenAI
from PIL import Image

from tests.integration.conftest import ENGINE_QUEUE_SIZE, LiveServer, needs_tiny_sd
from tests.integration.step_batching import run_scenario, shared_forwards

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


def start_blocker(client: httpx.Client, size: str = "32x32") -> str:
    """A slow demo-solo job, running when this returns: demo-solo jobs of its size queue until
    it is cancelled."""
    response = client.post("/v1/jobs", json={"model": "demo-solo", "size": size,
                                             "prompt": "black [[slow:50ms]]",
                                             "num_inference_steps": 200})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running",
               what="the blocker to start")
    return job_id


def generate(server: LiveServer, body: dict[str, Any], timeout: float = 60.0) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=timeout) as client:
        return client.post(GENERATIONS, json=body)


def shared(server: LiveServer, model: str = "demo") -> float:
    """Denoiser forwards so far that served more than one request."""
    with server.client() as client:
        return shared_forwards(client, model)


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


# -- step-level batching -----------------------------------------------------------------------


def test_concurrent_requests_share_steps_and_give_the_bytes_made_alone(
        engine_server: LiveServer) -> None:
    bodies = [{"model": "demo", "prompt": f"{colour} sky", "seed": seed, "n": n,
               "num_inference_steps": steps}
              for colour, seed, n, steps in (("red", 1, 1, 6), ("green", 2, 2, 3),
                                             ("blue", 3, 1, 9), ("a purple cat", 4, 1, 4))]
    before = shared(engine_server)
    anchor = {"model": "demo", "prompt": "white [[slow:20ms]]", "num_inference_steps": 30}
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        slow = pool.submit(generate, engine_server, anchor)  # keeps steps slow meanwhile
        together = list(pool.map(lambda body: generate(engine_server, body), bodies))
        assert slow.result().status_code == 200
    assert shared(engine_server) > before
    for body, response in zip(bodies, together, strict=True):
        assert response.status_code == 200, response.text
        alone = generate(engine_server, body)
        assert [d["b64_json"] for d in response.json()["data"]] == \
            [d["b64_json"] for d in alone.json()["data"]]


@needs_tiny_sd
def test_tiny_sd_mixed_steps_guidance_joins_and_a_cancellation_change_no_image(
        engine_server: LiveServer) -> None:
    # Steps of 4, 9 and 20 with three guidance scales join a running anchor, which is then
    # cancelled: the short one finishes first and every image is its alone bytes.
    with engine_server.client() as client:
        run_scenario(client, "tiny-sd", anchor_prompt="an anchor [[slow:10ms]]")


def test_a_failing_request_leaves_its_step_mates_correct(engine_server: LiveServer) -> None:
    bodies = [{"model": "demo", "prompt": prompt, "seed": seed, "num_inference_steps": 5}
              for prompt, seed in (("red [[slow:10ms]]", 5), ("green [[fail]]", 6),
                                   ("blue", 7))]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: generate(engine_server, body), bodies))
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
            response = client.post("/v1/jobs", json={"model": "demo-solo", "prompt": "red",
                                                     "seed": seed})
            assert response.status_code == 202, response.text
            queued.append(response.json()["id"])
        assert client.get(f"/v1/jobs/{queued[-1]}").json()["position"] == \
            ENGINE_QUEUE_SIZE - 1
        full = client.post(GENERATIONS, json={"model": "demo-solo", "prompt": "red"})
        full_job = client.post("/v1/jobs", json={"model": "demo-solo", "prompt": "red"})
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
    queued_before = metric(engine_server, "blockserve_cancellations_total", model="demo-solo",
                           stage="queued")
    with engine_server.client() as client:
        blocker = start_blocker(client)
        # Queued behind the blocker when its client gives up: its slot is freed.
        with pytest.raises(httpx.ReadTimeout):
            generate(engine_server, {"model": "demo-solo", "prompt": "red"}, timeout=0.5)
        wait_until(lambda: metric(engine_server, "blockserve_queue_depth") == 0,
                   what="the queue to empty")
        assert metric(engine_server, "blockserve_cancellations_total", model="demo-solo",
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
                 "blockserve_step_batch_size_bucket", "blockserve_denoise_steps_total",
                 "blockserve_step_seconds_bucket",
                 "blockserve_cancellations_total", "blockserve_timeouts_total"):
        assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text, name
