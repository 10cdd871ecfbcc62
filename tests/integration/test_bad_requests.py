"""Bad requests against a live server: each gets the right 4xx in OpenAI's error shape, names
the field where there is one, and the server keeps answering afterwards."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from tests.integration.conftest import (
    MAX_BODY_BYTES,
    SERVES_TINY_FLUX,
    SERVES_TINY_SD,
    LiveServer,
)

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


def _png(size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _gen(**body: Any) -> dict[str, Any]:
    return {"json": {"model": "demo", **body}}


def _raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _edit(files: dict[str, Any] | None = None, **data: Any) -> dict[str, Any]:
    files = {"image": ("in.png", _png(), "image/png")} if files is None else files
    return {"files": files, "data": {"model": "demo", "prompt": "blue", **data}}


@dataclass
class Case:
    name: str
    path: str
    request: dict[str, Any]
    status: int
    param: str | None = None
    method: str = "POST"
    code: str | None = None


CASES = [
    Case("missing prompt", GENERATIONS, _gen(), 400, "prompt", code="missing_required_parameter"),
    Case("empty prompt", GENERATIONS, _gen(prompt=""), 400, "prompt"),
    Case("blank prompt", GENERATIONS, _gen(prompt="   "), 400, "prompt"),
    Case("prompt over the model's limit", GENERATIONS, _gen(prompt="x" * 201), 400, "prompt",
         code="prompt_too_long"),
    Case("prompt not a string", GENERATIONS, _gen(prompt=["a", "b"]), 400, "prompt"),
    Case("unknown model", GENERATIONS, _gen(prompt="x", model="nope"), 404, "model",
         code="model_not_found"),
    Case("a path as model", GENERATIONS, _gen(prompt="x", model="/tmp/tiny-sd"), 404, "model"),
    Case("n = 0", GENERATIONS, _gen(prompt="x", n=0), 400, "n"),
    Case("n = 11", GENERATIONS, _gen(prompt="x", n=11), 400, "n"),
    Case("n over the model's limit", GENERATIONS, _gen(prompt="x", n=5), 400, "n"),
    Case("n not a number", GENERATIONS, _gen(prompt="x", n="two"), 400, "n"),
    Case("size not a multiple of 8", GENERATIONS, _gen(prompt="x", size="65x64"), 400, "size",
         code="invalid_size"),
    Case("size not allowed", GENERATIONS, _gen(prompt="x", size="128x128"), 400, "size"),
    Case("size malformed", GENERATIONS, _gen(prompt="x", size="big"), 400, "size"),
    Case("steps = 0", GENERATIONS, _gen(prompt="x", num_inference_steps=0), 400,
         "num_inference_steps"),
    Case("steps over the model's limit", GENERATIONS, _gen(prompt="x", num_inference_steps=9),
         400, "num_inference_steps"),
    Case("guidance on a model without it", GENERATIONS, _gen(prompt="x", guidance_scale=3), 400,
         "guidance_scale", code="unsupported_parameter"),
    Case("guidance NaN", GENERATIONS,
         _raw_json('{"model": "demo", "prompt": "x", "guidance_scale": NaN}'), 400,
         "guidance_scale"),
    Case("guidance infinite", GENERATIONS,
         _raw_json('{"model": "demo", "prompt": "x", "guidance_scale": Infinity}'), 400,
         "guidance_scale"),
    Case("negative guidance", GENERATIONS, _gen(prompt="x", guidance_scale=-1), 400,
         "guidance_scale"),
    Case("negative seed", GENERATIONS, _gen(prompt="x", seed=-1), 400, "seed"),
    Case("unknown response_format", GENERATIONS, _gen(prompt="x", response_format="gif"), 400,
         "response_format"),
    Case("unknown output_format", GENERATIONS, _gen(prompt="x", output_format="bmp"), 400,
         "output_format"),
    Case("unknown scheduler", GENERATIONS, _gen(prompt="x", scheduler="nope"), 400,
         "scheduler"),
    Case("unknown field", GENERATIONS, _gen(prompt="x", colour="red"), 400, "colour",
         code="unknown_parameter"),
    Case("negative prompt on a model without it", GENERATIONS,
         _gen(prompt="x", negative_prompt="blur"), 400, "negative_prompt"),
    Case("malformed JSON", GENERATIONS, _raw_json('{"prompt": '), 400, code="invalid_json"),
    Case("JSON not an object", GENERATIONS, _raw_json('["prompt"]'), 400),
    Case("form body on a JSON route", GENERATIONS, {"data": {"prompt": "x"}}, 415,
         code="unsupported_media_type"),
    Case("text body", GENERATIONS,
         {"content": b"x", "headers": {"content-type": "text/plain"}}, 415),
    Case("body over the limit", GENERATIONS, _raw_json(" " * (MAX_BODY_BYTES + 1)), 413,
         code="payload_too_large"),
    Case("chunked body over the limit", GENERATIONS,
         {"content": [b" " * 65536] * (MAX_BODY_BYTES // 65536 + 2),  # no length: chunked
          "headers": {"content-type": "application/json"}}, 413),
    Case("edit without image", EDITS, _edit(files={"mask": ("m.png", _png(), "image/png")}),
         400, "image", code="missing_required_parameter"),
    Case("edit with an unknown file", EDITS,
         _edit(files={"image": ("in.png", _png(), "image/png"),
                      "photo": ("p.png", _png(), "image/png")}), 400, "photo"),
    Case("edit with undecodable image", EDITS,
         _edit(files={"image": ("in.png", b"not an image", "image/png")}), 400, "image",
         code="invalid_image"),
    Case("edit with empty image", EDITS, _edit(files={"image": ("in.png", b"", "image/png")}),
         400, "image"),
    Case("edit JSON with bad base64", EDITS,
         {"json": {"model": "demo", "prompt": "x", "image": "%%%not-base64%%%"}}, 400, "image",
         code="invalid_base64"),
    Case("edit JSON with base64 of a non-image", EDITS,
         {"json": {"model": "demo", "prompt": "x",
                   "image": base64.b64encode(b"hello").decode()}}, 400, "image"),
    Case("edit with a mask on a model without inpaint", EDITS,
         _edit(files={"image": ("in.png", _png(), "image/png"),
                      "mask": ("m.png", _png(), "image/png")}), 400, "mask",
         code="unsupported_workflow"),
    Case("edit with two images", EDITS,
         _edit(files=[("image", ("a.png", _png(), "image/png")),
                      ("image", ("b.png", _png(), "image/png"))]), 400, "image"),
    Case("edit strength 0", EDITS, _edit(strength="0"), 400, "strength"),
    Case("edit strength 1.5", EDITS, _edit(strength="1.5"), 400, "strength"),
    Case("edit strength nan", EDITS, _edit(strength="nan"), 400, "strength"),
    Case("edit with text body", EDITS,
         {"content": b"x", "headers": {"content-type": "text/plain"}}, 415),
    Case("unknown model detail", "/v1/models/nope", {}, 404, "model_id", method="GET"),
    Case("unknown file", "/v1/files/nope", {}, 404, "file_id", method="GET"),
    Case("unknown route", "/v1/nope", {}, 404, method="GET"),
    Case("wrong method", "/v1/models", {}, 405, method="DELETE"),
]
SD_CASES = [
    Case("mask size differs from the image", EDITS,
         _edit(files={"image": ("in.png", _png((64, 64)), "image/png"),
                      "mask": ("m.png", _png((32, 32)), "image/png")}, model="tiny-sd"),
         400, "mask", code="mask_size_mismatch"),
    Case("guidance over the model's limit", GENERATIONS,
         _gen(model="tiny-sd", prompt="x", guidance_scale=11), 400, "guidance_scale"),
    Case("strength leaves no step", EDITS,
         _edit(model="tiny-sd", strength="0.1", num_inference_steps="2"), 400, "strength"),
    Case("a scheduler SD doesn't offer", GENERATIONS,
         _gen(model="tiny-sd", prompt="x", scheduler="karras"), 400, "scheduler"),
]
FLUX_CASES = [
    Case("size not a multiple of 16", GENERATIONS, _gen(model="tiny-flux", prompt="x",
         size="40x40"), 400, "size", code="invalid_size"),
    Case("strength on an image-conditioned model", EDITS,
         _edit(model="tiny-flux", strength="0.5",
               files={"image": ("in.png", _png((64, 64)), "image/png")}), 400, "strength"),
    Case("reference image below the family's minimum", EDITS,
         _edit(model="tiny-flux"), 400, code="invalid_input"),
]
CASES += SD_CASES if SERVES_TINY_SD else []
CASES += FLUX_CASES if SERVES_TINY_FLUX else []


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request(server: LiveServer, case: Case) -> None:
    with server.client() as client:
        response = client.request(case.method, case.path, **case.request)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if case.param is not None:
        assert body["error"]["param"] == case.param, body
        assert case.param in body["error"]["message"] or case.status == 404, body
    if case.code is not None:
        assert body["error"]["code"] == case.code, body
    assert response.headers.get("x-request-id")


def test_messages_name_the_allowed_values(server: LiveServer) -> None:
    with server.client() as client:
        size = client.post(GENERATIONS, json={"model": "demo", "prompt": "x", "size": "128x128"})
        model = client.post(GENERATIONS, json={"model": "nope", "prompt": "x"})
        steps = client.post(GENERATIONS, json={"model": "demo", "prompt": "x",
                                               "num_inference_steps": 9})
    assert "32x32, 64x64" in size.json()["error"]["message"]
    assert "demo" in model.json()["error"]["message"]
    assert "1 to 8" in steps.json()["error"]["message"]


def test_server_still_answers_after_bad_requests(server: LiveServer) -> None:
    with server.client() as client:
        for case in CASES:
            client.request(case.method, case.path, **case.request)
        assert client.get("/healthz").status_code == 200
        ok = client.post(GENERATIONS, json={"model": "demo", "prompt": "red", "seed": 1})
        assert ok.status_code == 200, ok.text
    assert server.process.poll() is None
    assert "Traceback" not in server.log()


def test_json_with_a_charset_parameter_is_json(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post(GENERATIONS, content=json.dumps({"prompt": "x"}).encode(),
                               headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text
