"""The app in-process (FastAPI's TestClient, no server): failure paths that a live server can't
be made to show on demand, plus the registry, file store, block timing and metrics."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from blocks import InvalidInput
from blocks.demo import DemoAutoBlocks, DemoAutoDenoise, DemoDecodeStep, DemoTextEncoderStep
from service.app import create_app
from service.auth import key_matches
from service.engine import QueueFull
from service.file_store import FileStore
from service.models_file import parse_models
from service.registry import READY, ModelRegistry
from service.settings import Settings

DEMO = {"models": {"demo": {"family": "demo", "defaults": {"steps": 2, "size": "32x32"}}}}
GENERATE = {"model": "demo", "prompt": "red", "seed": 1}


class StubEngine:
    """An engine whose futures are decided by the test."""

    def __init__(self, outcome: str | Exception) -> None:
        self.outcome = outcome
        self.jobs: list = []

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def cancel(self, job, reason="cancelled") -> bool:
        return job.cancel(reason)

    @property
    def queued(self) -> int:
        return 0

    @property
    def running(self) -> int:
        return 0

    def submit(self, job):
        self.jobs.append(job)
        if self.outcome == "busy":
            raise QueueFull("64 jobs are already waiting", retry_after=7)
        future: Future = Future()
        if isinstance(self.outcome, Exception):
            future.set_exception(self.outcome)
        return future  # "hang": never resolves


def make_app(tmp_path: Path, models=DEMO, engine=None, **settings):
    return create_app(Settings(models_file=tmp_path / "unused.yaml", **settings),
                      parse_models(models, tmp_path), engine)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


def test_unexpected_errors_are_a_plain_500_logged_with_the_request_id(tmp_path, caplog):
    app = make_app(tmp_path, engine=StubEngine(RuntimeError("secret detail at /opt/weights")))
    with TestClient(app, raise_server_exceptions=False) as client, \
            caplog.at_level(logging.ERROR, logger="blockserve.requests"):
        wait_ready(client)
        response = client.post("/v1/images/generations", json=GENERATE)
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert error == {"message": f"internal server error; request id {request_id}",
                     "type": "server_error", "param": None, "code": "internal_error"}
    assert "secret" not in response.text
    assert any(request_id in record.getMessage() for record in caplog.records)


class ForgetfulDecodeStep(DemoDecodeStep):
    """A wiring bug: declares `images` and never sets it."""

    def __call__(self, components, state):
        self.set_block_state(state, self.get_block_state(state))
        return components, state


class MiswiredBlocks(DemoAutoBlocks):
    block_classes = [DemoTextEncoderStep, DemoAutoDenoise, ForgetfulDecodeStep]


def test_a_wiring_bug_in_a_block_is_a_500_logged_with_the_request_id(tmp_path, caplog):
    from dataclasses import replace

    from blocks.families import get_family, register_family

    register_family(replace(get_family("demo"), name="demo-miswired", blocks=MiswiredBlocks))
    app = make_app(tmp_path, {"models": {"demo": {"family": "demo-miswired"}}})
    with TestClient(app, raise_server_exceptions=False) as client, \
            caplog.at_level(logging.ERROR, logger="blockserve.requests"):
        wait_ready(client)
        response = client.post("/v1/images/generations", json=GENERATE)
    assert response.status_code == 500  # a ValueError, but not the client's: no 400
    request_id = response.headers["x-request-id"]
    assert response.json()["error"]["message"] == f"internal server error; request id {request_id}"
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "declared output 'images' was not set" in str(logged[0].exc_info[1])


@pytest.mark.parametrize(("error", "status", "param"), [
    (InvalidInput("vae_encoder.preprocess: reference image is 32x32; both sides must be at "
                  "least 64 px", "image"), 400, "image"),
    (ValueError("denoise.loop: declared output 'latents' was not set"), 500, None),
])
def test_only_invalid_input_from_the_blocks_is_the_clients_fault(tmp_path, error, status, param):
    with TestClient(make_app(tmp_path, engine=StubEngine(error)),
                    raise_server_exceptions=False) as client:
        wait_ready(client)
        response = client.post("/v1/images/generations", json=GENERATE)
    body = response.json()["error"]
    assert (response.status_code, body["param"]) == (status, param)
    assert ("reference image is 32x32" in body["message"]) == (status == 400)  # 500s leak nothing


def test_a_full_queue_is_429_with_the_engines_retry_after(tmp_path):
    with TestClient(make_app(tmp_path, engine=StubEngine("busy"))) as client:
        wait_ready(client)
        response = client.post("/v1/images/generations", json=GENERATE)
        job = client.post("/v1/jobs", json=GENERATE)
    for answer in (response, job):
        assert answer.status_code == 429
        assert answer.headers["retry-after"] == "7"
        assert answer.json()["error"]["code"] == "queue_full"


def test_a_generation_past_the_timeout_is_cancelled_and_504(tmp_path):
    engine = StubEngine("hang")
    app = make_app(tmp_path, engine=engine, request_timeout_seconds=0.3)
    with TestClient(app) as client:
        wait_ready(client)
        response = client.post("/v1/images/generations", json=GENERATE)
    assert response.status_code == 504
    assert engine.jobs[0].cancelled.is_set() and engine.jobs[0].stop_reason == "timeout"


def test_not_ready_until_loaded(tmp_path):
    app = make_app(tmp_path)
    client = TestClient(app)  # not entered: startup (and so loading) has not run
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["models"] == {"demo": {"state": "pending"}}
    generation = client.post("/v1/images/generations", json=GENERATE)
    assert generation.status_code == 503
    assert generation.json()["error"]["code"] == "model_loading"
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/models/demo").json()["blocks"] is None


def test_a_model_that_fails_to_load_keeps_readyz_503_and_the_process_up(tmp_path):
    empty = tmp_path / "empty-checkpoint"
    empty.mkdir()
    models = {"models": {**DEMO["models"], "broken": {"family": "sd", "path": str(empty)}}}
    with TestClient(make_app(tmp_path, models)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").json()["models"]["broken"]["state"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "model_index.json" in ready.json()["models"]["broken"]["error"]
        broken = client.post("/v1/images/generations", json={**GENERATE, "model": "broken"})
        assert broken.status_code == 503
        assert broken.json()["error"]["code"] == "model_unavailable"
        assert client.post("/v1/images/generations", json=GENERATE).status_code == 200


def test_each_app_has_its_own_metrics(tmp_path):
    with TestClient(make_app(tmp_path)) as first, TestClient(make_app(tmp_path)) as second:
        wait_ready(first)
        assert first.post("/v1/images/generations", json=GENERATE).status_code == 200
        assert 'blockserve_images_generated_total{model="demo"} 1.0' in first.get("/metrics").text
        assert "blockserve_images_generated_total{" not in second.get("/metrics").text


def test_openapi_documents_the_bodies_with_this_deployments_values(tmp_path):
    schema = TestClient(make_app(tmp_path)).get("/openapi.json").json()
    body = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert ["demo"] in [branch.get("enum") for branch in body["model"]["anyOf"]]
    assert ["32x32", "auto"] in [branch.get("enum") for branch in body["size"]["anyOf"]]
    edits = schema["paths"]["/v1/images/edits"]["post"]
    assert set(edits["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert "422" not in edits["responses"] and "400" in edits["responses"]


def test_key_matching():
    assert key_matches("b", ("a", "b"))
    assert not key_matches("c", ("a", "b"))
    assert not key_matches("", ("a",))


def test_file_store_expires_and_respects_its_budget():
    now = [0.0]
    store = FileStore(ttl_seconds=10, max_bytes=10, clock=lambda: now[0])
    first = store.put(b"12345", "image/png")
    second = store.put(b"67890", "image/png")
    assert store.get(first).data == b"12345"
    third = store.put(b"abc", "image/png")  # over budget: the oldest goes
    assert store.get(first) is None and store.get(second) is not None
    now[0] = 11
    assert store.get(second) is None and store.get(third) is None
    assert len(first) >= 20  # unguessable


def test_the_engine_times_each_top_level_block_and_counts_steps(tmp_path):
    with TestClient(make_app(tmp_path)) as client:
        wait_ready(client)
        assert client.post("/v1/images/generations", json=GENERATE).status_code == 200
        metrics = client.get("/metrics").text
    for block in ("text_encoder", "denoise", "decode"):
        assert f'blockserve_block_duration_seconds_count{{block="{block}",model="demo"}} 1.0' \
            in metrics
    assert 'blockserve_denoise_steps_total{model="demo"} 2.0' in metrics  # demo: 2 steps
    assert 'blockserve_step_batch_size_count{model="demo"} 2.0' in metrics
    assert 'blockserve_step_seconds_count{model="demo"} 2.0' in metrics


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from blocks.flux2.tiny_model import write_tiny_flux2_klein

    return write_tiny_flux2_klein(tmp_path_factory.mktemp("flux") / "tiny-flux")


def test_requests_get_schedulers_of_their_own_and_worker_pipelines_share_weights(tiny_flux):
    from dataclasses import replace

    from blocks.families import get_family, register_family

    # FLUX.2 with a second scheduler name, registered as a family of its own (opening no
    # checkpoint class: the checkpoint still gets FLUX.2's blocks).
    flux = get_family("flux2-klein")
    register_family(replace(
        flux, name="flux2-klein-two-schedulers", checkpoint_classes={},
        schedulers={**flux.schedulers, "flow_match_copy": "FlowMatchEulerDiscreteScheduler"},
    ))
    models = parse_models({"models": {"flux": {"family": "flux2-klein-two-schedulers",
                                               "path": str(tiny_flux),
                                               "defaults": {"size": "32x32"}}}}, tiny_flux)
    registry = ModelRegistry(models)
    model = registry.load("flux")
    assert registry.state("flux") == READY
    assert model.default_scheduler == "flow_match_euler"
    base_scheduler = model.base.components["scheduler"]
    own = model.new_scheduler("flow_match_euler")
    assert own is not base_scheduler and own.config == base_scheduler.config
    copied = model.new_scheduler("flow_match_copy")
    assert copied is not own and copied.config == base_scheduler.config
    weights = registry.manager.bytes_by_device()
    worker = model.pipeline(1)
    assert worker is model.pipeline(1) and worker is not model.base  # made once
    assert worker.components["transformer"] is model.base.components["transformer"]
    assert registry.manager.bytes_by_device() == weights  # no second copy of any weight
    with pytest.raises(ValueError, match="flow_match_euler"):
        model.new_scheduler("ddim")
