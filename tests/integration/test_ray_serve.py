"""Distributed mode on a local Ray cluster (2 CPUs, loopback): heavy blocks on their own
deployments, the embedded app as the Serve ingress, the same pixels as embedded mode.

One Serve application (module-scoped) serves every test here; it takes ~30 s to start.
"""

from __future__ import annotations

import base64
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
from deployments.remote_block import remote_pipeline_blocks  # noqa: E402
from tests.integration.conftest import local_serve_app  # noqa: E402

MODEL = "tiny-sd"
MODELS_YAML = """
models:
  tiny-sd:
    family: sd
    path: {path}
    create_tiny: sd
    defaults: {{steps: 2, guidance_scale: 5.0, size: 32x32}}
    sizes: [32x32, 64x64]
    limits: {{max_steps: 4, max_n: 2, max_prompt_length: 200, max_guidance_scale: 10}}
"""
ROLES = ("TextEncoder", "Denoiser", "VAE")


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("ray")
    models_file = folder / "models.yaml"
    models_file.write_text(MODELS_YAML.format(path=folder / "tiny-sd"))
    args = {"models_file": str(models_file), "batch_wait_timeout_s": 0.05}
    with local_serve_app(args) as base_url:
        handles = {role: serve.get_deployment_handle(role, app_name="blockserve")
                   for role in ROLES}
        yield {"url": base_url, "handles": handles, "path": str(folder / "tiny-sd"),
               "models_file": models_file}


def _pipelines(ray_app) -> tuple[ModularPipeline, ModularPipeline]:
    local = ModularPipeline.from_pretrained(ray_app["path"])
    local.load_components(dtype=torch.float32)
    remote = remote_pipeline_blocks(local.blocks, MODEL, ray_app["handles"]).init_pipeline(
        ray_app["path"])
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


def _png(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_http_same_png_as_embedded_app(ray_app) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    body = {"model": MODEL, "prompt": "a blue square", "seed": 11, "size": "32x32"}
    got = httpx.post(f"{ray_app['url']}/v1/images/generations", json=body, timeout=120)
    assert got.status_code == 200, got.text
    settings = Settings.from_env(models_file=ray_app["models_file"], api_keys="")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        expected = client.post("/v1/images/generations", json=body)
    assert expected.status_code == 200, expected.text
    # Both compute under batch-invariant CPU kernels, whichever process runs a block.
    assert got.json()["data"][0]["b64_json"] == expected.json()["data"][0]["b64_json"]


def test_sixteen_concurrent_requests_succeed_and_the_denoiser_batches(ray_app) -> None:
    def generate(seed: int) -> int:
        body = {"model": MODEL, "prompt": f"shape {seed}", "seed": seed, "size": "32x32"}
        return httpx.post(f"{ray_app['url']}/v1/images/generations", json=body,
                          timeout=180).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(generate, range(16)))
    assert codes == [200] * 16
    info = ray_app["handles"]["Denoiser"].info.remote().result()
    assert any(size > 1 for size in info["batch_sizes"]), info["batch_sizes"]


def test_batched_denoise_gives_the_images_made_alone(ray_app) -> None:
    seeds = [21, 22, 23]

    def generate(seed: int) -> np.ndarray:
        body = {"model": MODEL, "prompt": "batch me", "seed": seed, "size": "32x32"}
        response = httpx.post(f"{ray_app['url']}/v1/images/generations", json=body,
                              timeout=180)
        assert response.status_code == 200, response.text
        return _png(response.json()["data"][0]).astype(int)

    alone = [generate(seed) for seed in seeds]
    with ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(generate, seeds))
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)  # batch-invariant CPU kernels in the Denoiser


def test_model_detail_names_the_deployment_of_each_heavy_block(ray_app) -> None:
    detail = httpx.get(f"{ray_app['url']}/v1/models/{MODEL}", timeout=30).json()
    placement = detail["placement"]
    assert placement["denoise"]["deployment"] == "Denoiser"
    assert placement["decode"]["deployment"] == "VAE"
    assert placement["text_encoder"]["replicas"] >= 1


def test_job_reports_started_and_completed_and_delete_cancels(ray_app) -> None:
    url = ray_app["url"]
    body = {"model": MODEL, "prompt": "a job", "seed": 5, "size": "32x32"}
    created = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json())["status"] \
            not in ("succeeded", "completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["status"] in ("succeeded", "completed"), status

    # Queue a burst, then cancel the last one: it ends cancelled, not with an image.
    ids = [httpx.post(f"{url}/v1/jobs", json={**body, "seed": s}, timeout=30).json()["id"]
           for s in range(20)]
    cancelled = httpx.delete(f"{url}/v1/jobs/{ids[-1]}", timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{url}/v1/jobs/{ids[-1]}", timeout=30).json())["status"] \
            not in ("succeeded", "completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["status"] == "cancelled", status


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
