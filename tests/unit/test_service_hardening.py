"""What an attacker's input meets before any model runs, in-process: JSON parsing, event ids,
image headers and the decode gate, settings that must not fail open, the job store's byte
budget, checkpoint staging leftovers, the component-class allowlist, missing checkpoints, and
the middleware's handling of client aborts and stalled bodies. The live-server side of the
same points is `tests/integration/test_hostile.py`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from blocks.loading import CheckpointNotFound, ComponentLoadError, import_class, read_index
from service.errors import APIError
from service.image_io import (
    MAX_INPUT_SIDE,
    DecodeGate,
    decode_bytes_estimate,
    decode_image,
    decoding_session,
)
from service.job_store import JobRecord, JobStore
from service.jobs import GenerationJob
from service.metrics import ServiceMetrics
from service.middleware import ServiceMiddleware
from service.registry import remove_stale_staging
from service.routes.jobs import parse_last_event_id
from service.routes.request_bodies import parse_json
from service.settings import Settings, SettingsError
from tests.unit.test_service_app import DEMO, GENERATE, make_app, wait_ready


def error_of(function, *args) -> APIError:
    with pytest.raises(APIError) as caught:
        function(*args)
    return caught.value


# -- JSON and headers ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["n", "seed", "num_inference_steps"])
def test_an_integer_too_long_to_convert_is_a_400_naming_its_field(field):
    body = f'{{"prompt": "x", "{field}": {"1" * 5000}}}'
    error = error_of(parse_json, body.encode())
    assert (error.status, error.param, error.code) == (400, field, "invalid_value")
    assert f"'{field}'" in error.message and "5000 digits" in error.message


def test_json_parsing_failures_are_400s():
    nested = error_of(parse_json, b"[" * 100_000)
    assert (nested.status, nested.code) == (400, "invalid_json")
    assert error_of(parse_json, b"\xff\xfe").code == "invalid_json"
    deep = error_of(parse_json, ('{"a": [1, {"b": -%s}]}' % ("9" * 4400)).encode())
    assert deep.param == "a.1.b"
    assert parse_json(b'{"n": 12}') == {"n": 12}


def testparse_last_event_id_must_be_one_of_our_event_ids():
    assert parse_last_event_id(None) == 0
    assert parse_last_event_id(" 7 ") == 7
    for bad in ("²", "9" * 5000, "-1", "1e3", "٣"):
        error = error_of(parse_last_event_id, bad)
        assert (error.status, error.param) == (400, "Last-Event-ID")
        assert "Last-Event-ID" in error.message


# -- images --------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data would not match)."""
    image = Image.new("L", (1, 1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the IHDR's CRC
    return bytes(data)


@pytest.mark.parametrize(("width", "height", "why"), [
    (1, 16_000_000, "side"), (MAX_INPUT_SIDE + 1, 8, "side"), (4096, 64, "longer"),
    (20_000, 20_000, "pixels"),  # past PIL's own cap, which Image.open enforces
])
def test_image_size_limits_are_checked_from_the_header(width, height, why):
    error = error_of(decode_image, _png_header(width, height), "image")
    assert (error.status, error.param, error.code) == (400, "image", "image_too_large")
    assert why in error.message and "'image'" in error.message


def test_only_png_jpeg_and_webp_are_opened():
    for fmt in ("GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=fmt)
        error = error_of(decode_image, buffer.getvalue(), "mask")
        assert (error.param, error.code) == ("mask", "invalid_image")


def test_the_decode_gate_bounds_decodes_and_bytes_then_says_429():
    gate = DecodeGate(max_decodes=2, max_bytes=10 * 2**20, wait_s=0.05)
    gate.reserve(4 * 2**20, "image")
    gate.reserve(4 * 2**20, "mask")
    busy = error_of(gate.reserve, 1, "image")  # no decode slot left
    assert (busy.status, busy.param, busy.headers) == (429, "image", {"Retry-After": "1"})
    gate.decoded()
    gate.decoded()  # both decodes done; their 8 MiB stay held
    assert error_of(gate.reserve, 7 * 2**20, "image").status == 429  # bytes: 8 + 7 > 10
    assert error_of(gate.reserve, 11 * 2**20, "image").status == 400  # never fits
    gate.release(4 * 2**20)
    gate.release(4 * 2**20)
    assert gate.in_use == (0, 0)


def test_a_decoding_session_releases_what_it_reserved_even_on_failure():
    gate = DecodeGate(max_decodes=1, max_bytes=2**30)
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 32)).save(buffer, format="PNG")
    with pytest.raises(RuntimeError), decoding_session(gate) as decoding:
        first = decode_image(buffer.getvalue(), "image", decoding)
        second = decode_image(buffer.getvalue(), "image", decoding)  # one slot: reused
        assert gate.in_use == (0, 2 * decode_bytes_estimate(first))
        assert second.size == (64, 32)
        raise RuntimeError("the request failed later")
    assert gate.in_use == (0, 0)


def test_a_request_whose_images_could_never_fit_together_is_a_400():
    gate = DecodeGate(max_decodes=4, max_bytes=decode_bytes_estimate(
        Image.new("RGB", (64, 64))) * 2)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    with decoding_session(gate) as decoding:
        decode_image(buffer.getvalue(), "image", decoding)
        decode_image(buffer.getvalue(), "image", decoding)
        error = error_of(decode_image, buffer.getvalue(), "mask", decoding)
    assert (error.status, error.param, error.code) == (400, "mask", "image_too_large")
    assert gate.in_use == (0, 0)


def test_a_waiting_decode_gets_the_slot_when_one_is_released():
    gate = DecodeGate(max_decodes=1, max_bytes=2**20, wait_s=5.0)
    gate.reserve(10, "image")
    threading.Timer(0.1, gate.decoded).start()
    gate.reserve(10, "image")
    assert gate.in_use == (1, 20)


# -- settings ------------------------------------------------------------------------------


def test_api_keys_that_hold_no_key_are_an_error_not_auth_off():
    with pytest.raises(SettingsError, match="BLOCKSERVE_API_KEYS"):
        Settings.from_env({"BLOCKSERVE_API_KEYS": " , "})
    assert Settings.from_env({"BLOCKSERVE_API_KEYS": ""}).api_keys == ()
    assert Settings.from_env({"BLOCKSERVE_API_KEYS": "k1,"}).api_keys == ("k1",)


def test_returned_urls_start_with_the_configured_base_never_the_host_header():
    assert Settings(public_url="https://img.example/").base_url() == "https://img.example"
    assert Settings(host="127.0.0.1", port=9000).base_url() == "http://127.0.0.1:9000"
    assert Settings(host="::1", port=9000).base_url() == "http://[::1]:9000"
    assert Settings(host="0.0.0.0").base_url() == ""  # bound everywhere: relative URLs
    with pytest.raises(ValueError):
        Settings(public_url="javascript:alert(1)")


def test_host_header_is_not_reflected_in_urls_or_locations(tmp_path):
    app = make_app(tmp_path, public_url="https://img.example")
    with TestClient(app, base_url="http://evil.example") as client:
        wait_ready(client)
        image = client.post("/v1/images/generations",
                            json={**GENERATE, "response_format": "url"})
        job = client.post("/v1/jobs", json=GENERATE)
        slash = client.get("/v1/models/", follow_redirects=False)
    assert image.json()["data"][0]["url"].startswith("https://img.example/v1/files/")
    assert job.headers["location"].startswith("https://img.example/v1/jobs/")
    assert "evil.example" not in slash.headers.get("location", "")


def test_readyz_shows_why_a_model_failed_only_with_a_key(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    models = {"models": {**DEMO["models"], "broken": {"family": "sd", "path": str(missing)}}}
    with TestClient(make_app(tmp_path, models, api_keys=("k",))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").json()["models"]["broken"]["state"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        anonymous = client.get("/readyz").json()["models"]["broken"]["error"]
        wrong_key = client.get("/readyz", headers={"Authorization": "Bearer x"})
        keyed = client.get("/readyz", headers={"Authorization": "Bearer k"})
    assert str(missing) not in anonymous and "server log" in anonymous
    assert str(missing) not in wrong_key.text
    detail = keyed.json()["models"]["broken"]["error"]
    assert f"checkpoint folder not found: {missing}" in detail  # not an HFValidationError


# -- stores and files ----------------------------------------------------------------------


def _finished_record(b64_bytes: int) -> JobRecord:
    record = JobRecord(GenerationJob(model="demo", workflow="text2image", prompt="x", n=1,
                                     width=32, height=32, steps=1, seed=0))
    record.succeed({"data": [{"b64_json": "A" * b64_bytes, "seed": 0}]})
    return record


def test_the_job_store_forgets_the_oldest_finished_jobs_past_its_byte_budget():
    store = JobStore(ttl_seconds=600, max_finished=100, max_bytes=250_000)
    records = [_finished_record(100_000) for _ in range(4)]
    for record in records:
        store.add(record)
    store.get(records[0].id)  # the purge runs on access
    kept = [r.id for r in records if store.get(r.id) is not None]
    assert kept == [r.id for r in records[2:]]


def test_stale_checkpoint_staging_folders_are_removed(tmp_path):
    target = tmp_path / "tiny-sd"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftovers = [tmp_path / f".tiny-sd-{dead}-abcd1234", tmp_path / ".tiny-sd-old12345"]
    live = tmp_path / f".tiny-sd-{os.getpid()}-live1234"
    sibling = tmp_path / f".tiny-sd-xl-{dead}-abcd1234"  # another checkpoint's
    for folder in (*leftovers, live, sibling):
        (folder / "checkpoint").mkdir(parents=True)
    assert sorted(remove_stale_staging(target)) == sorted(leftovers)
    assert live.is_dir() and sibling.is_dir()


def write_then_hang(out_dir: Path, **_options: object) -> Path:
    """A tiny-checkpoint writer that stops half way (a process to `kill -9` there)."""
    out_dir.mkdir(parents=True)
    (out_dir / "half-written.bin").write_bytes(b"\0" * 1024)
    time.sleep(120)
    return out_dir


def write_index_only(out_dir: Path, **_options: object) -> Path:
    out_dir.mkdir(parents=True)
    (out_dir / "model_index.json").write_text("{}")
    return out_dir


def _tiny_sd_config(target: Path, writer: str):
    """A models-file entry of SD declared again, as a family of its own, with `writer` as its
    tiny-checkpoint writer (opening no checkpoint class: SD's own stay SD's)."""
    import dataclasses

    from blocks.families import get_family, register_family
    from service.models_file import parse_models

    name = f"sd-{writer.rsplit(':', 1)[1].replace('_', '-')}"
    register_family(dataclasses.replace(get_family("sd"), name=name, checkpoint_classes={},
                                        tiny_writer=writer))
    return parse_models({"models": {"t": {"family": name, "path": str(target),
                                          "create_tiny": name}}}, target.parent).models["t"]


def test_a_writer_killed_mid_checkpoint_leaves_nothing_after_the_next_start(tmp_path):
    """`kill -9` while the tiny checkpoint is written (the real `ensure_checkpoint`, its writer
    made to stop half way), then a start: the staging folder goes, the checkpoint is whole."""
    from service import registry

    target = tmp_path / "tiny-sd"
    here = "tests.unit.test_service_hardening"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from service import registry; "
        f"from {here} import _tiny_sd_config; "
        f"config = _tiny_sd_config(Path(sys.argv[1]), '{here}:write_then_hang'); "
        "registry.ensure_checkpoint(config)"),
        str(target)], cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".tiny-sd-*/checkpoint/half-written.bin")):
            assert writer.poll() is None and time.monotonic() < deadline, "never began"
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    assert list(tmp_path.glob(".tiny-sd-*"))  # what kill -9 leaves
    registry.ensure_checkpoint(_tiny_sd_config(target, f"{here}:write_index_only"))  # next start
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (target / "model_index.json").is_file()


# -- checkpoints ---------------------------------------------------------------------------


def test_an_index_cannot_make_the_server_import_any_module(tmp_path):
    sys.modules.pop("this", None)
    error = error_of_load(import_class, "this", "s", "scheduler")
    assert "'scheduler'" in error and "'this'" in error and "diffusers, transformers" in error
    assert "this" not in sys.modules  # never imported: importing it runs its code
    assert "not a component class" in error_of_load(import_class, "diffusers", "logging",
                                                    "vae")
    assert import_class("diffusers", "AutoencoderKL").__name__ == "AutoencoderKL"


def error_of_load(function, *args) -> str:
    with pytest.raises(ComponentLoadError) as caught:
        function(*args)
    return str(caught.value)


def test_a_checkpoint_naming_another_library_fails_to_load_naming_the_entry(tmp_path):
    from blocks import ModularPipeline
    from tests.unit.tiny_family import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "ckpt")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["this", "s"]
    (folder / "model_index.json").write_text(json.dumps(index))
    sys.modules.pop("this", None)
    with pytest.raises(ComponentLoadError, match=r"'scheduler'.*'this'"):
        ModularPipeline.from_pretrained(str(folder))
    assert "this" not in sys.modules


def test_a_missing_checkpoint_folder_is_named_and_a_hub_id_offline_names_its_repo(
        tmp_path, monkeypatch):
    with pytest.raises(CheckpointNotFound, match=f"checkpoint folder not found: {tmp_path}/no"):
        read_index(str(tmp_path / "no"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointNotFound, match=r"'org-that/does-not-exist'.*HF_HUB_OFFLINE"):
        read_index("org-that/does-not-exist")


# -- the middleware ------------------------------------------------------------------------


def _run_middleware(messages: list[dict], read_timeout_s: float = 30.0,
                    stall_after: bool = False) -> tuple[list[dict], ServiceMetrics]:
    """One request through ServiceMiddleware around a route that reads its whole body."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    metrics = ServiceMetrics(manager=_NoManager())
    sent: list[dict] = []

    async def route(scope, receive, send):
        body = await Request(scope, receive).body()
        await JSONResponse({"bytes": len(body)})(scope, receive, send)

    async def main() -> None:
        pending = list(messages)

        async def receive():
            if pending:
                return pending.pop(0)
            if stall_after:
                await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/images/generations",
                 "headers": [(b"content-type", b"application/json")]}
        middleware = ServiceMiddleware(route, max_body_bytes=1 << 20, metrics=metrics,
                                       read_timeout_s=read_timeout_s)
        await middleware(scope, receive, send)

    asyncio.run(main())
    return sent, metrics


class _NoManager:
    offload_log: list = []

    def bytes_by_device(self) -> dict:
        return {}


def _count(metrics: ServiceMetrics, status: str) -> float:
    return metrics.registry.get_sample_value(
        "blockserve_requests_total",
        {"model": "unknown", "workflow": "unknown", "status": status}) or 0.0


def test_a_client_leaving_mid_upload_is_a_499_not_a_server_error(caplog):
    sent, metrics = _run_middleware([{"type": "http.request", "body": b"{", "more_body": True},
                                     {"type": "http.disconnect"}])
    assert sent == []  # nobody to answer
    assert _count(metrics, "499") == 1 and _count(metrics, "500") == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


class _ProxyCallFailed(Exception):
    """What Ray's `TaskCancelledError` is to the app: `receive` is a call back into Serve's
    proxy, and it fails once the proxy has dropped the request (unit tests run no Ray)."""


@pytest.mark.parametrize("news", ["task cancelled", "receive fails"])
def test_a_client_leaving_mid_upload_behind_a_proxy_is_a_499(news, caplog):
    """How Ray Serve's proxy tells the app that a client left mid-upload: part of the body has
    arrived, then either the replica's task is cancelled while it waits for more, or its next
    `receive` fails. Never the `http.disconnect` uvicorn sends."""
    from starlette.requests import Request

    metrics = ServiceMetrics(manager=_NoManager())
    sent: list[dict] = []

    async def route(scope, receive, send):
        await Request(scope, receive).body()

    async def main() -> None:
        first = [{"type": "http.request", "body": b'{"prompt": "aa', "more_body": True}]
        waiting = asyncio.Event()

        async def receive():
            if first:
                return first.pop(0)
            if news == "receive fails":
                raise _ProxyCallFailed("Task: 248c2add was cancelled.")
            waiting.set()
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/images/generations",
                 "headers": [(b"content-type", b"application/json")]}
        middleware = ServiceMiddleware(route, max_body_bytes=1 << 20, metrics=metrics)
        task = asyncio.create_task(middleware(scope, receive, send))
        if news == "task cancelled":
            await waiting.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # the cancellation goes on to whoever cancelled
        else:
            await task

    asyncio.run(main())
    assert sent == []  # nobody to answer
    assert _count(metrics, "499") == 1 and _count(metrics, "500") == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_body_that_stalls_gets_408_and_the_connection_closes():
    start = time.monotonic()
    sent, metrics = _run_middleware(
        [{"type": "http.request", "body": b"{", "more_body": True}], read_timeout_s=0.2,
        stall_after=True)
    assert time.monotonic() - start < 5
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert b"request_timeout" in sent[1]["body"]
    assert _count(metrics, "408") == 1
