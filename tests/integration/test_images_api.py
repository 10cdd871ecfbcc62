"""The images API on a live server, through OpenAI's own client and plain HTTP."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from PIL import Image

from tests.integration.conftest import (
    API_KEY,
    OPENAI_MODEL_NAMES,
    SERVES_TINY_FLUX,
    SERVES_TINY_SD,
    LiveServer,
    needs_tiny_flux,
    needs_tiny_sd,
)

MODELS = ["demo", *(["tiny-sd"] if SERVES_TINY_SD else []),
          *(["tiny-flux"] if SERVES_TINY_FLUX else [])]


def openai_client(server: LiveServer, api_key: str | None = API_KEY) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key or "unused",
                  max_retries=0, timeout=120.0)


def server_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def png_image(b64_json: str) -> Image.Image:
    data = base64.b64decode(b64_json)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_bytes(size: tuple[int, int], colour: str | tuple[int, ...] = "red",
              mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model", MODELS)
def test_generate_two_pngs_of_the_asked_size(server: LiveServer, model: str) -> None:
    result = openai_client(server).images.generate(
        model=model, prompt="a red circle", n=2, size="64x64", extra_body={"seed": 7}
    )
    assert len(result.data) == 2
    for item, seed in zip(result.data, (7, 8), strict=True):
        image = png_image(item.b64_json)
        assert image.size == (64, 64)
        assert item.model_dump()["seed"] == seed


@pytest.mark.parametrize("model", MODELS)
def test_same_seed_same_bytes_alone_or_in_a_batch(server: LiveServer, model: str) -> None:
    client = openai_client(server)
    batch = client.images.generate(model=model, prompt="a blue sky", n=2, size="32x32",
                                   extra_body={"seed": 41})
    again = client.images.generate(model=model, prompt="a blue sky", n=2, size="32x32",
                                   extra_body={"seed": 41})
    alone = client.images.generate(model=model, prompt="a blue sky", n=1, size="32x32",
                                   extra_body={"seed": 42})
    assert [d.b64_json for d in batch.data] == [d.b64_json for d in again.data]
    assert alone.data[0].b64_json == batch.data[1].b64_json  # image i uses seed + i
    assert batch.data[0].b64_json != batch.data[1].b64_json


def test_edit_with_the_openai_client(server: LiveServer) -> None:
    result = openai_client(server).images.edit(
        model="demo", image=("in.png", png_bytes((48, 48)), "image/png"),
        prompt="make it blue", size="32x32", extra_body={"seed": 3, "strength": 0.5},
    )
    assert len(result.data) == 1
    assert png_image(result.data[0].b64_json).size == (32, 32)
    assert result.data[0].model_dump()["seed"] == 3


@needs_tiny_sd
def test_sd_image_to_image_and_inpaint(server: LiveServer) -> None:
    client = openai_client(server)
    info = httpx.get(f"{server.base_url}/v1/models/tiny-sd", headers=server_headers()).json()
    edited = client.images.edit(model="tiny-sd", image=("in.png", png_bytes((64, 64)),
                                "image/png"), prompt="a cat", size="64x64",
                                extra_body={"seed": 1, "strength": 0.6})
    assert png_image(edited.data[0].b64_json).size == (64, 64)
    if "inpaint" in info["workflows"]:
        mask = png_bytes((64, 64), (0, 0, 0, 0), "RGBA")
        inpainted = client.images.edit(model="tiny-sd", image=("in.png", png_bytes((64, 64)),
                                       "image/png"), mask=("m.png", mask, "image/png"),
                                       prompt="a cat", size="64x64", extra_body={"seed": 1})
        assert png_image(inpainted.data[0].b64_json).size == (64, 64)


@needs_tiny_sd
def test_sd_schedulers_are_swapped_per_request(server: LiveServer) -> None:
    client = openai_client(server)

    def generate(scheduler: str | None) -> str:
        extra = {"seed": 5, **({"scheduler": scheduler} if scheduler else {})}
        return client.images.generate(model="tiny-sd", prompt="a cat", size="32x32",
                                      extra_body=extra).data[0].b64_json

    default, ddim, default_again = generate(None), generate("ddim"), generate(None)
    assert default == default_again  # the DDIM request left the default pipeline alone
    assert ddim != default


@needs_tiny_flux
def test_flux_image_conditioned_edit(server: LiveServer) -> None:
    client = openai_client(server)
    result = client.images.edit(model="tiny-flux", image=("ref.png", png_bytes((64, 64)),
                                "image/png"), prompt="a cat like this", size="32x32",
                                extra_body={"seed": 2})
    assert png_image(result.data[0].b64_json).size == (32, 32)
    with server.client() as http:
        small = http.post("/v1/images/edits", data={"model": "tiny-flux", "prompt": "x"},
                          files={"image": ("ref.png", png_bytes((32, 32)), "image/png")})
        odd = http.post("/v1/images/generations", json={"model": "tiny-flux", "prompt": "x",
                                                         "size": "40x40"})
    assert small.status_code == 400, small.text  # the block's own rule, not a 500
    assert "64" in small.json()["error"]["message"]
    assert odd.status_code == 400 and "multiples of 16" in odd.json()["error"]["message"]


def test_url_response_format_serves_the_file(server: LiveServer) -> None:
    result = openai_client(server).images.generate(
        model="demo", prompt="green", response_format="url", extra_body={"seed": 1}
    )
    url = result.data[0].url
    assert url is not None and url.startswith(server.base_url + "/v1/files/")
    response = httpx.get(url, headers=server_headers())
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)


def test_output_formats(server: LiveServer) -> None:
    with server.client() as client:
        for output_format, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
            response = client.post("/v1/images/generations", json={
                "model": "demo", "prompt": "red", "output_format": output_format, "seed": 1})
            assert response.status_code == 200, response.text
            assert base64.b64decode(response.json()["data"][0]["b64_json"]).startswith(magic)


def test_models_list_and_block_tree(server: LiveServer) -> None:
    client = openai_client(server)
    assert [m.id for m in client.models.list().data] == MODELS
    with server.client() as http:
        detail = http.get("/v1/models/demo").json()
    assert detail["family"] == "demo"
    assert detail["aliases"] == list(OPENAI_MODEL_NAMES)  # names hard-coded clients send
    assert detail["workflows"] == ["text2image", "image2image"]
    tree = detail["blocks"]
    assert [child["name"] for child in tree["sub_blocks"]] == ["text_encoder", "denoise",
                                                                "decode"]
    encoder = tree["sub_blocks"][0]
    assert any(p["name"] == "prompt" and p["required"] for p in encoder["inputs"])
    assert {o["name"] for o in encoder["outputs"]} == {"prompt_embeds", "batch_size"}


def test_auth_required_on_v1_but_not_on_probes(server: LiveServer) -> None:
    with pytest.raises(AuthenticationError):
        openai_client(server, api_key="wrong-key").models.list()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.get(f"{server.base_url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        # A generous timeout: this checks auth, not latency (a loaded CI machine can take >5 s).
        assert httpx.get(f"{server.base_url}{path}", timeout=60).status_code == 200


def test_auth_off_needs_no_key(open_server: LiveServer) -> None:
    result = openai_client(open_server, api_key=None).images.generate(
        model="demo", prompt="red", extra_body={"seed": 2})
    assert png_image(result.data[0].b64_json).size == (32, 32)


def test_request_id_header(server: LiveServer) -> None:
    with server.client() as client:
        assert len(client.get("/healthz").headers["x-request-id"]) == 32
        echoed = client.get("/healthz", headers={"x-request-id": "abc-123"})
        assert echoed.headers["x-request-id"] == "abc-123"


def test_metrics_after_requests(server: LiveServer) -> None:
    openai_client(server).images.generate(model="demo", prompt="red", extra_body={"seed": 1})
    text = httpx.get(f"{server.base_url}/metrics").text
    assert 'blockserve_requests_total{model="demo",status="200",workflow="text2image"}' in text
    assert 'blockserve_block_duration_seconds_count{block="denoise",model="demo"}' in text
    assert 'blockserve_images_generated_total{model="demo"}' in text
    for name in ("blockserve_request_duration_seconds_bucket",
                 "blockserve_component_loads_total", "blockserve_component_offloads_total"):
        assert name in text
    if SERVES_TINY_SD:
        assert 'blockserve_component_resident_bytes{device="cpu"}' in text


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_all_succeed_and_stay_deterministic(server: LiveServer,
                                                                model: str) -> None:
    def generate(seed: int) -> str:
        with server.client() as client:
            response = client.post("/v1/images/generations",
                                   json={"model": model, "prompt": "a cat", "seed": seed})
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["b64_json"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        images = list(pool.map(generate, [1, 2] * 6))
    assert len(set(images[0::2])) == 1 and len(set(images[1::2])) == 1
    assert images[0] != images[1]
