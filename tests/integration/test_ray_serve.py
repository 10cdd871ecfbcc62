"""Distributed mode on a local Ray cluster (2 CPUs, loopback): heavy blocks on their own
deployments, the embedded app as the Serve ingress, the same engine, events and pixels as
embedded mode.

One Serve application (module-scoped) serves every test here; it takes ~30 s to start.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install '.[ray]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from blocks import ModularPipeline  # noqa: E402
from blocks.families import get_family  # noqa: E402
from blocks.lora import write_lora_file  # noqa: E402
from blocks.lora.tiny_lora import random_lora  # noqa: E402
from blocks.stable_diffusion.tiny_model import write_tiny_sd  # noqa: E402
from deployments.remote_block import remote_pipeline_blocks  # noqa: E402
from tests.integration.conftest import local_serve_app  # noqa: E402
from tests.integration.step_batching import (  # noqa: E402
    job_events,
    run_scenario,
    shared_forwards,
)

MODEL = "tiny-sd"
SDXL = "tiny-sdxl"
MODELS_YAML = """
models:
  tiny-sd:
    family: sd
    path: {path}
    create_tiny: sd
    defaults: {{steps: 2, guidance_scale: 5.0, size: 32x32}}
    sizes: [32x32, 64x64]
    limits: {{max_steps: 50, max_n: 2, max_prompt_length: 200, max_guidance_scale: 10}}
    loras: {{ink: {{source: {lora}, scale: 0.8}}}}
  tiny-sdxl:
    family: sdxl
    path: {sdxl_path}
    create_tiny: sdxl
    defaults: {{steps: 2, guidance_scale: 5.0, size: 32x32}}
    sizes: [32x32, 32x48]
    limits: {{max_steps: 4, max_n: 2, max_prompt_length: 200, max_guidance_scale: 10}}
"""
# The default model too, for "Ray = embedded" on the model a new user meets first.
SHAPES_YAML = """
  tiny-shapes-sd:
    family: sd
    path: {path}
    defaults: {{steps: 20, guidance_scale: 5, size: 64x64}}
    sizes: [64x64]
"""
SHAPES = Path(__file__).resolve().parents[2] / "assets" / "tiny-shapes-sd"
ROLES = ("TextEncoder", "Denoiser", "VAE")


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("ray")
    models_file = folder / "models.yaml"
    # The tiny model written here (not at start), to draw an adapter for its UNet and CLIP.
    tiny = ModularPipeline.from_pretrained(str(write_tiny_sd(folder / "tiny-sd")))
    tiny.load_components(dtype=torch.float32)
    lora = write_lora_file(folder / "ink.safetensors", *random_lora(
        {"unet": tiny.unet, "text_encoder": tiny.text_encoder}, rank=2, seed=1))
    models_file.write_text(MODELS_YAML.format(path=folder / "tiny-sd",
                                              sdxl_path=folder / "tiny-sdxl", lora=lora)
                           + SHAPES_YAML.format(path=SHAPES))
    with local_serve_app({"models_file": str(models_file)}) as base_url:
        handles = {role: serve.get_deployment_handle(role, app_name="blockserve")
                   for role in ROLES}
        yield {"url": base_url, "handles": handles, "path": str(folder / "tiny-sd"),
               "models_file": models_file}


@pytest.fixture(scope="module")
def embedded(ray_app):
    """The embedded app on the same models file, in this process."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings.from_env(models_file=ray_app["models_file"], api_keys="")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield client


def _pipelines(ray_app) -> tuple[ModularPipeline, ModularPipeline]:
    local = ModularPipeline.from_pretrained(ray_app["path"])
    local.load_components(dtype=torch.float32)
    remote = remote_pipeline_blocks(local.blocks, MODEL, ray_app["handles"],
                                    get_family("sd").heavy_blocks).init_pipeline(ray_app["path"])
    remote.load_components(dtype=torch.float32)
    for pipe in (local, remote):
        pipe.set_progress_bar_config(disable=True)
    return local, remote


def test_router_pipeline_holds_no_weights(ray_app) -> None:
    _, remote = _pipelines(ray_app)
    loaded = {name for name, c in remote.components.items() if c is not None}
    assert loaded <= {"scheduler"}, loaded  # weight-free only; UNet/VAE/CLIP live remotely


def test_same_pixels_as_embedded_text2image_and_edit(ray_app) -> None:
    local, remote = _pipelines(ray_app)
    common = dict(prompt="a red fox", num_inference_steps=2, height=32, width=32,
                  guidance_scale=5.0, output_type="np", output="images")
    expected = np.asarray(local(generator=torch.Generator().manual_seed(3), **common))
    got = np.asarray(remote(generator=torch.Generator().manual_seed(3), **common))
    assert got.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1e-4

    source = Image.fromarray((expected[0] * 255).round().astype("uint8"))
    edit = dict(common, image=source, strength=0.6)
    expected = np.asarray(local(generator=[torch.Generator().manual_seed(4)], **edit))
    got = np.asarray(remote(generator=[torch.Generator().manual_seed(4)], **edit))
    assert np.abs(got - expected).max() <= 1e-4


def test_readyz_says_every_deployment_can_serve(ray_app) -> None:
    body = httpx.get(f"{ray_app['url']}/readyz", timeout=30).json()
    assert body["status"] == "ready"
    assert body["placement"]["deployments"] == dict.fromkeys(ROLES, "ready")


def test_default_model_gives_the_embedded_bytes_at_several_seeds(ray_app, embedded) -> None:
    for seed in (1, 2, 3):
        body = {"prompt": "a red circle on a blue background", "seed": seed, "size": "64x64",
                "model": "tiny-shapes-sd"}
        got = httpx.post(f"{ray_app['url']}/v1/images/generations", json=body, timeout=120)
        assert got.status_code == 200, got.text
        expected = embedded.post("/v1/images/generations", json=body)
        assert expected.status_code == 200, expected.text
        # One engine and the batch-invariant CPU kernels in both: the same PNG bytes.
        assert got.json()["data"][0]["b64_json"] == expected.json()["data"][0]["b64_json"], seed
    # A job's step cache travels with its denoise task to the Denoiser's step scheduler.
    cached = {**body, "step_cache": "deepcache"}
    counts_before = _step_cache_counts(ray_app, embedded)
    got_cached = httpx.post(f"{ray_app['url']}/v1/images/generations", json=cached,
                            timeout=120)
    assert got_cached.status_code == 200, got_cached.text
    expected_cached = embedded.post("/v1/images/generations", json=cached)
    assert got_cached.json()["data"][0]["b64_json"] == \
        expected_cached.json()["data"][0]["b64_json"] != got.json()["data"][0]["b64_json"]
    # Its decisions reach the router's /metrics with the Denoiser's step reports: the same
    # full and cached counts as the embedded app's.
    (ray_full, ray_cached), (embedded_full, embedded_cached) = [
        (full - full_before, cached - cached_before) for (full, cached), (
            full_before, cached_before) in zip(_step_cache_counts(ray_app, embedded),
                                              counts_before, strict=True)]
    assert (ray_full, ray_cached) == (embedded_full, embedded_cached)
    assert ray_full > 0 and ray_cached > 0


def _step_cache_counts(ray_app, embedded) -> list[tuple[float, float]]:
    """(full, cached) of tiny-shapes-sd's deepcache forwards in the Ray app's and the embedded
    app's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = []
    for text in (httpx.get(f"{ray_app['url']}/metrics", timeout=30).text,
                 embedded.get("/metrics").text):
        kinds = {sample.labels["kind"]: sample.value
                 for family in text_string_to_metric_families(text)
                 for sample in family.samples
                 if sample.name == "blockserve_step_cache_forwards_total"
                 and sample.labels["model"] == "tiny-shapes-sd"
                 and sample.labels["method"] == "deepcache"}
        counts.append((kinds.get("full", 0.0), kinds.get("cached", 0.0)))
    return counts


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _sdxl_requests() -> list[tuple[str, dict]]:
    """(route, request) pairs: SDXL text-to-image (two images, a negative prompt,
    non-square) and inpainting."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
    mask = np.zeros((48, 32), dtype=np.uint8)
    mask[12:36, 8:24] = 255
    return [
        ("generations", {"json": {"model": SDXL, "prompt": "a red fox", "n": 2, "seed": 7,
                                  "size": "32x48", "negative_prompt": "blurry"}}),
        ("edits", {"data": {"model": SDXL, "prompt": "a cat", "seed": "8", "size": "32x48"},
                   "files": {"image": ("image.png", _png_bytes(image), "image/png"),
                             "mask": ("mask.png", _png_bytes(mask), "image/png")}}),
    ]


def test_sdxl_gives_the_embedded_apps_pngs(ray_app, embedded) -> None:
    for route, request in _sdxl_requests():
        got = httpx.post(f"{ray_app['url']}/v1/images/{route}", timeout=120, **request)
        expected = embedded.post(f"/v1/images/{route}", **request)
        assert got.status_code == expected.status_code == 200, (route, got.text)
        # One engine and the batch-invariant CPU kernels in both: the same PNG bytes.
        assert [item["b64_json"] for item in got.json()["data"]] == [
            item["b64_json"] for item in expected.json()["data"]], route


def test_a_requests_lora_adapter_gives_the_embedded_bytes(ray_app, embedded) -> None:
    # The adapter loads in the TextEncoder and Denoiser replicas (its tensors from the pool)
    # and applies there: the same PNG as embedded mode, not the one without it.
    body = {"prompt": "a red fox", "seed": 5, "model": MODEL}
    adapted = {**body, "loras": [{"name": "ink", "scale": 0.8}]}
    got = httpx.post(f"{ray_app['url']}/v1/images/generations", json=adapted, timeout=120)
    assert got.status_code == 200, got.text
    expected = embedded.post("/v1/images/generations", json=adapted)
    assert expected.status_code == 200, expected.text
    plain = httpx.post(f"{ray_app['url']}/v1/images/generations", json=body, timeout=120)
    assert got.json()["data"][0]["b64_json"] == expected.json()["data"][0]["b64_json"] \
        != plain.json()["data"][0]["b64_json"]
    unknown = httpx.post(f"{ray_app['url']}/v1/images/generations",
                         json={**body, "loras": [{"name": "pixel"}]}, timeout=30)
    assert unknown.status_code == 400
    assert unknown.json()["error"]["message"] == \
        f"lora 'pixel' is not available for model '{MODEL}'; available: ink"
    detail = httpx.get(f"{ray_app['url']}/v1/models/{MODEL}", timeout=30).json()
    assert [(lora["name"], lora["scale"]) for lora in detail["loras"]] == [("ink", 0.8)]
    # One pool entry for the file, held by both replicas that loaded it.
    pooled = detail["placement"]["weights"]["components"]["lora/ink"]
    assert len(pooled["resident"]) == 2, pooled
    # /metrics counts a load per replica that loaded it (reported with the pool's heartbeat).
    loads = f'blockserve_lora_loads_total{{lora="ink",model="{MODEL}"}} 2.0'
    deadline = time.monotonic() + 10
    while loads not in (metrics := httpx.get(f"{ray_app['url']}/metrics", timeout=30).text):
        assert time.monotonic() < deadline, [line for line in metrics.splitlines()
                                             if "blockserve_lora" in line]
        time.sleep(0.5)
    assert metrics.count("# TYPE blockserve_lora_loads_total counter") == 1


def test_mixed_steps_guidance_joins_and_a_cancellation_change_no_image(ray_app) -> None:
    with httpx.Client(base_url=ray_app["url"], timeout=120) as client:
        run_scenario(client, MODEL)


def test_jobs_get_embedded_modes_events_with_progress_and_previews(ray_app, embedded) -> None:
    job = {"model": MODEL, "prompt": "a job", "seed": 5, "num_inference_steps": 6,
           "preview": True}
    with httpx.Client(base_url=ray_app["url"], timeout=120) as client:
        got = job_events(client, job)
    assert got[:2] == [("queued", 0), ("started", None)]
    assert got[-2:] == [("progress", (6, 6, 1)), ("completed", 1)]
    assert got == job_events(embedded, job)


def test_streaming_with_partial_images(ray_app) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{ray_app['url']}/v1", api_key="unused", max_retries=0)
    received = list(client.images.generate(
        model=MODEL, prompt="a stream", stream=True, partial_images=2,
        extra_body={"seed": 8, "num_inference_steps": 6}))
    assert [event.type for event in received] == [
        "image_generation.partial_image", "image_generation.partial_image",
        "image_generation.completed"]


def test_sixteen_concurrent_requests_succeed_and_share_denoiser_steps(ray_app) -> None:
    def generate(seed: int) -> int:
        body = {"model": MODEL, "prompt": f"shape {seed}", "seed": seed, "size": "32x32",
                "num_inference_steps": 4}
        return httpx.post(f"{ray_app['url']}/v1/images/generations", json=body,
                          timeout=180).status_code

    with httpx.Client(base_url=ray_app["url"], timeout=30) as client:
        before = shared_forwards(client, MODEL)
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(generate, range(16)))
        assert codes == [200] * 16
        assert shared_forwards(client, MODEL) > before


def test_model_detail_names_the_deployment_of_each_heavy_block(ray_app) -> None:
    detail = httpx.get(f"{ray_app['url']}/v1/models/{MODEL}", timeout=30).json()
    placement = detail["placement"]
    assert placement["denoise"]["deployment"] == "Denoiser"
    assert placement["decode"]["deployment"] == "VAE"
    assert placement["text_encoder"]["replicas"] >= 1


def test_serve_config_is_a_valid_serve_config_naming_every_deployment() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "deployments" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    application = config["applications"][0]
    assert application["import_path"] == "service.ray_placement:build_app"
    names = {d["name"] for d in application["deployments"]}
    assert names == {"Router", *ROLES}
    for deployment in application["deployments"]:
        assert {"ray_actor_options", "autoscaling_config", "max_ongoing_requests",
                "max_queued_requests"} <= set(deployment)
