"""The ring LoRA (`recipes.shapes.lora_training`): its training is seeded (same seed, same
bytes) and writes diffusers' layout; the committed adapter (assets/ring-lora) is small, loads
in blockserve and in diffusers with the same result, and is served by the default models file
by name."""

from __future__ import annotations

import base64
import io
import json
import pathlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from openai import OpenAI
from PIL import Image

from recipes.shapes.evaluation import load_shapes_pipeline
from recipes.shapes.lora_training import RingLoraConfig
from recipes.shapes.scoring import read_shape
from service.app import create_app
from service.models_file import load_models_file
from service.settings import DEFAULT_MODELS_FILE, Settings
from tests.unit.test_service_app import wait_ready

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "assets" / "tiny-shapes-sd"
ADAPTER = ROOT / "assets" / "ring-lora"
MAX_ADAPTER_BYTES = 2 * 1024 * 1024
PROMPT, SEED = "a red ring on a blue background", 0

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_the_committed_adapter_loads_in_blockserve_and_diffusers_alike() -> None:
    import diffusers

    weights = ADAPTER / "pytorch_lora_weights.safetensors"
    assert weights.stat().st_size <= MAX_ADAPTER_BYTES
    training = json.loads((ADAPTER / "training.json").read_text())
    assert training["config"] == json.loads(json.dumps(RingLoraConfig().__dict__))

    prompt = PROMPT
    kwargs = {"num_inference_steps": 20, "guidance_scale": 5.0, "output_type": "np"}
    ours = load_shapes_pipeline(CHECKPOINT)
    ours.load_lora_weights(str(ADAPTER), adapter_name="ring")
    image = ours(prompt=prompt, generator=torch.Generator().manual_seed(SEED), output="images",
                 **kwargs)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        CHECKPOINT, safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(ADAPTER), adapter_name="ring")
    theirs = reference(prompt, generator=torch.Generator().manual_seed(SEED), **kwargs).images
    np.testing.assert_allclose(np.asarray(image), np.asarray(theirs), atol=1e-4)
    reading = read_shape((np.asarray(image)[0] * 255).round().astype(np.uint8))
    assert (reading.shape, reading.colour, reading.background) == ("ring", "red", "blue")


def test_the_default_models_file_serves_the_ring_adapter_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKSERVE_CACHE_DIR", str(tmp_path))
    models = load_models_file(DEFAULT_MODELS_FILE)
    models = models.model_copy(update={"models": {"tiny-shapes-sd":
                                                  models.models["tiny-shapes-sd"]}})
    assert models.models["tiny-shapes-sd"].loras["ring"].source == str(ADAPTER)
    app = create_app(Settings(models_file=tmp_path / "unused.yaml"), models)
    with TestClient(app) as http:
        wait_ready(http)
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)

        def reading(loras: list | None):
            extra = {"seed": SEED, **({"loras": loras} if loras is not None else {})}
            data = client.images.generate(model="tiny-shapes-sd", prompt=PROMPT,
                                          extra_body=extra).data[0].b64_json
            return read_shape(Image.open(io.BytesIO(base64.b64decode(data))))

        assert reading(None).shape != "ring"  # the base model has no rings
        ring = reading([{"name": "ring", "scale": 1.0}])
        assert (ring.shape, ring.colour, ring.background) == ("ring", "red", "blue")
        assert http.get("/v1/models/tiny-shapes-sd").json()["loras"] == [
            {"name": "ring", "scale": 1.0, "loaded": True}]
