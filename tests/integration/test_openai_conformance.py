"""Today's OpenAI Images API, from the `openai` package's own types (no copy of anyone's spec):
every field of `ImageGenerateParams`, `ImageEditParams` and `ImageCreateVariationParams` is
sent, through the SDK, with each of its literal values (a sample value where it has none),
and must be answered 200, or 400 naming that field for a value no model here can serve;
every response and stream event must validate against the SDK's response and event types.

The values blockserve promises to serve are listed (`MUST_SERVE`), so a regression to a 400
fails even though a 400 naming the field would pass the generic rule.
"""

from __future__ import annotations

import base64
import typing
from typing import Any

import httpx
import openai
import pytest
from openai.types import (
    ImagesResponse,
    image_create_variation_params,
    image_edit_params,
    image_generate_params,
)
from openai.types.image_edit_stream_event import ImageEditStreamEvent
from openai.types.image_gen_stream_event import ImageGenStreamEvent
from pydantic import TypeAdapter

from tests.integration.conftest import OPENAI_MODEL_NAMES, LiveServer, needs_tiny_flux
from tests.integration.test_images_api import openai_client, png_bytes

PNG = png_bytes((32, 32), "blue")
# A sample for each field whose type has no literal values.
SAMPLES: dict[str, Any] = {
    "prompt": "a red circle", "model": "demo", "n": 2, "size": "32x32",
    "output_compression": 50, "partial_images": 1, "user": "user-1",
    "safety_identifier": "hashed-user-1", "frame_count": 3, "frame_duration_ms": 100,
    "svg": {"model": "svg-author"}, "image": ("in.png", PNG, "image/png"),
    "mask": ("mask.png", PNG, "image/png"), "markup": ("markup.png", PNG, "image/png"),
}
FILES = ("image", "mask", "markup")
# What blockserve serves (200), by field: None means every value of the field.
MUST_SERVE: dict[str, list[Any] | None] = {
    "prompt": None, "n": None, "user": None, "safety_identifier": None, "stream": None,
    "partial_images": None, "output_compression": None, "response_format": None,
    "quality": None, "moderation": None, "style": None, "input_fidelity": None,
    "model": ["demo", *OPENAI_MODEL_NAMES],  # aliases of the demo model on this server
    "background": ["auto", "opaque", None], "size": ["auto", "32x32", None],
    "output_format": ["png", "jpeg", "webp", None], "image": None,
}


def _values(annotation: Any) -> list[Any]:
    """The literal values (and None) a parameter's type admits."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if annotation is type(None):
        return [None]
    values: list[Any] = []
    for argument in typing.get_args(annotation):
        values += [v for v in _values(argument) if v not in values]
    return values


def cases(params: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(params, include_extras=True)
    found = []
    for name, annotation in hints.items():
        # Files: the SDK itself refuses anything but a file, so one sample file each.
        values = [] if name in FILES else _values(annotation)
        if name in SAMPLES and SAMPLES[name] not in values:
            values.append(SAMPLES[name])
        found += [(name, value) for value in values]
    return found


def _expect(field: str, value: Any, call: Any) -> Any:
    """Run `call`; 200 (returns what it returned) or a 400 naming `field`."""
    served = MUST_SERVE.get(field, [])
    try:
        result = call()
    except openai.BadRequestError as error:
        assert error.status_code == 400
        body = error.body if isinstance(error.body, dict) else {}
        assert body.get("param") == field or f"'{field}'" in str(body.get("message")), body
        assert served is not None and value not in served, f"{field}={value!r}: {body}"
        return None
    return result


def _check_response(response: Any) -> None:
    raw = response.model_dump(exclude_unset=True)
    ImagesResponse.model_validate(raw)
    for name in ("usage", "size", "quality", "background", "output_format", "data"):
        assert raw.get(name) is not None, f"response lacks {name}: {sorted(raw)}"
    assert raw["usage"]["input_tokens"] > 0 and raw["usage"]["output_tokens"] == len(raw["data"])


def _check_stream(stream: Any, adapter: TypeAdapter) -> None:
    events = [event.model_dump(exclude_unset=True) for event in stream]
    assert events and events[-1]["type"].endswith(".completed")
    for event in events:
        adapter.validate_python(event)  # required fields present, literals in range
    completed = [e for e in events if e["type"].endswith(".completed")]
    assert all(e["usage"]["total_tokens"] > 0 for e in completed)


def _check(field: str, value: Any, call: Any, kwargs: dict[str, Any],
           events: TypeAdapter) -> None:
    """`call(**kwargs)` answered 200 (a response, or a stream of `events`) or 400 naming
    `field`."""
    result = _expect(field, value, lambda: call(**kwargs))
    if result is None:
        return
    if kwargs.get("stream"):
        _check_stream(result, events)
    else:
        _check_response(result)


@pytest.mark.parametrize(("field", "value"),
                         [*cases(image_generate_params.ImageGenerateParamsBase),
                          ("stream", True), ("stream", False)],
                         ids=lambda v: repr(v)[:40])
def test_every_generation_field_and_value(server: LiveServer, field: str, value: Any) -> None:
    kwargs = {"prompt": "a red circle", "model": "demo", "size": "32x32", field: value}
    _check(field, value, openai_client(server).images.generate, kwargs,
           TypeAdapter(ImageGenStreamEvent))


@pytest.mark.parametrize(("field", "value"),
                         [*cases(image_edit_params.ImageEditParamsBase),
                          ("stream", True), ("stream", False)],
                         ids=lambda v: repr(v)[:40])
def test_every_edit_field_and_value(server: LiveServer, field: str, value: Any) -> None:
    kwargs = {"image": SAMPLES["image"], "prompt": "make it red", "model": "demo",
              "size": "32x32", field: value}
    _check(field, value, openai_client(server).images.edit, kwargs,
           TypeAdapter(ImageEditStreamEvent))


@pytest.mark.parametrize(("field", "value"),
                         cases(image_create_variation_params.ImageCreateVariationParams),
                         ids=lambda v: repr(v)[:40])
def test_every_variation_field_and_value(server: LiveServer, field: str, value: Any) -> None:
    client = openai_client(server)
    kwargs = {"image": SAMPLES["image"], "model": "demo", "size": "32x32", field: value}
    result = _expect(field, value, lambda: client.images.create_variation(**kwargs))
    if result is not None:
        _check_response(result)


def test_several_images_where_the_model_takes_one_name_the_limit(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(server).images.edit(image=[SAMPLES["image"]] * 2, prompt="x",
                                          model="demo")
    assert caught.value.body["param"] == "image"
    assert "takes one input image" in caught.value.body["message"]


@needs_tiny_flux
def test_several_reference_images_for_flux(server: LiveServer) -> None:
    reference = ("ref.png", png_bytes((64, 64), "green"), "image/png")
    result = openai_client(server).images.edit(image=[reference, reference], prompt="x",
                                               model="tiny-flux", size="32x32")
    _check_response(result)
    assert result.usage.input_tokens_details.image_tokens == 2


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_json_edits_in_openais_current_shape(server: LiveServer) -> None:
    with server.client() as http:
        made = http.post("/v1/images/generations", json={
            "model": "demo", "prompt": "red", "response_format": "url", "seed": 1}).json()
        file_id = made["data"][0]["url"].rsplit("/", 1)[1]
        for image in ({"image_url": _data_url(PNG)}, {"file_id": file_id}):
            response = http.post("/v1/images/edits", json={
                "model": "demo", "prompt": "blue", "images": [image], "seed": 2})
            assert response.status_code == 200, response.text
            ImagesResponse.model_validate(response.json())
        for image, fragment in (({"image_url": "https://example.com/a.png"}, "not fetched"),
                                ({"file_id": "nope"}, "does not exist"),
                                ({"image_url": _data_url(PNG), "file_id": file_id},
                                 "exactly one")):
            response = http.post("/v1/images/edits", json={
                "model": "demo", "prompt": "blue", "images": [image]})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"].startswith("images")
            assert fragment in response.json()["error"]["message"]


def test_a_multipart_image_without_a_filename_is_read_by_its_content_type(
        server: LiveServer) -> None:
    body = (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nblue\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndemo\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + PNG + b"\r\n--b--\r\n")
    response = httpx.post(f"{server.base_url}/v1/images/edits", content=body,
                          headers={**server.headers,
                                   "content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 200, response.text


def test_partial_images_are_numbered_per_image(server: LiveServer) -> None:
    stream = openai_client(server).images.generate(
        prompt="red", model="demo", n=2, size="32x32", stream=True, partial_images=2,
        extra_body={"num_inference_steps": 6})
    partials = [e for e in stream if e.type == "image_generation.partial_image"]
    assert len(partials) == 4
    assert sorted(e.partial_image_index for e in partials) == [0, 1, 2, 3]
    assert sorted(e.model_dump()["image_index"] for e in partials) == [0, 0, 1, 1]


def test_quality_sets_the_step_count(server: LiveServer) -> None:
    with server.client() as http:
        seconds = {}
        for quality in ("low", "high"):
            response = http.post("/v1/jobs", json={"model": "demo", "prompt": "red",
                                                   "quality": quality})
            assert response.status_code == 202, response.text
            seconds[quality] = response.json()["total_steps"]
    assert seconds == {"low": 1, "high": 4}  # the demo's default is 2 steps
