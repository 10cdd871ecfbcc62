"""LoRA adapters in the service: the models file's `loras`, the request's `loras` checked
against them, and the per-model LRU that loads adapters on first use and keeps at most
`max_loaded_loras` (never unloading one a request is using)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from blocks import ModularPipeline
from blocks.lora import write_lora_file
from blocks.lora.tiny_lora import random_lora
from blocks.stable_diffusion.tiny_model import write_tiny_sd
from deployments.lora_cache import LoraCache, LoraLoadError, PipelineLoraLoader
from service.app import create_app
from service.errors import APIError
from service.models_file import ModelsFileError, parse_models
from service.ray_placement import heavy_models
from service.schemas import ImageGenerationRequest
from service.settings import Settings
from service.validation import requested_loras
from tests.unit.test_service_app import wait_ready

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def _models(tmp_path: Path, loras: dict, **extra) -> dict:
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    return {"models": {"m": {"family": "sd", "path": "./ckpt", "loras": loras, **extra}}}


def test_models_file_resolves_lora_sources_and_names_what_is_wrong(tmp_path):
    (tmp_path / "ring.safetensors").write_bytes(b"")
    models = parse_models(_models(tmp_path, {
        "ring": {"source": "./ring.safetensors", "scale": 0.8},
        "hub": {"source": "someone/some-lora", "weight_name": "a.safetensors"},
    }, max_loaded_loras=2), tmp_path)
    loras = models.models["m"].loras
    assert loras["ring"].source == str(tmp_path / "ring.safetensors")
    assert loras["ring"].scale == 0.8
    assert loras["hub"].source == "someone/some-lora"  # a Hub repo id stays one
    assert models.models["m"].max_loaded_loras == 2

    with pytest.raises(ModelsFileError, match=r"models\.m\.loras\.gone\.source: no such file"):
        parse_models(_models(tmp_path, {"gone": {"source": "./gone.safetensors"}}), tmp_path)
    with pytest.raises(ModelsFileError, match="lora name 'bad name' must match"):
        parse_models(_models(tmp_path, {"bad name": {"source": "a/b"}}), tmp_path)
    with pytest.raises(ModelsFileError, match="scale"):
        parse_models(_models(tmp_path, {"x": {"source": "a/b", "scale": 11}}), tmp_path)
    # Ray mode: the replicas get the allowed adapters as plain data (no paths from requests).
    heavy = heavy_models(models)["m"]
    assert heavy["loras"]["hub"] == {"source": "someone/some-lora",
                                     "weight_name": "a.safetensors", "scale": 1.0}
    assert heavy["max_loaded_loras"] == 2
    with pytest.raises(ModelsFileError, match="family 'demo' takes no LoRA adapters"):
        parse_models({"models": {"d": {"family": "demo", "loras": {"x": {"source": "a/b"}}}}},
                     tmp_path)


class _Model:
    """What `requested_loras` reads of a loaded model: its name and configuration."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "a.safetensors").write_bytes(b"")
        config = parse_models(_models(tmp_path, {
            "ink": {"source": "./a.safetensors", "scale": 0.6},
            "pixel": {"source": "./a.safetensors"},
        }, max_loaded_loras=2), tmp_path).models["m"]
        self.name, self.config = "m", config


def _request(loras) -> ImageGenerationRequest:
    return ImageGenerationRequest(prompt="a ring", loras=loras)


def test_requests_name_allowed_adapters_only(tmp_path):
    model = _Model(tmp_path)
    assert requested_loras(_request(None), model) == ()
    assert requested_loras(_request([{"name": "ink"}, {"name": "pixel", "scale": -0.5}]),
                           model) == (("ink", 0.6), ("pixel", -0.5))
    for loras, message, param in [
        ([{"name": "./a.safetensors"}],
         "lora './a.safetensors' is not available for model 'm'; available: ink, pixel",
         "loras[0].name"),
        ([{"name": "ink"}, {"name": "ink"}], "lora 'ink' is given twice", "loras[1].name"),
    ]:
        with pytest.raises(APIError) as caught:
            requested_loras(_request(loras), model)
        assert caught.value.status == 400
        assert caught.value.body()["error"]["message"] == message
        assert caught.value.body()["error"]["param"] == param
    model.config = model.config.model_copy(update={"max_loaded_loras": 1})
    with pytest.raises(APIError, match="2 loras requested; model 'm' keeps at most 1 loaded"):
        requested_loras(_request([{"name": "ink"}, {"name": "pixel"}]), model)


def test_multipart_forms_send_loras_as_json():
    fields = ImageGenerationRequest.model_validate(
        {"prompt": "x", "loras": '[{"name": "ink", "scale": 0.5}]'})
    assert fields.loras[0].name == "ink" and fields.loras[0].scale == 0.5
    with pytest.raises(ValueError, match="must be a list like"):
        ImageGenerationRequest.model_validate({"prompt": "x", "loras": "ink"})


@pytest.fixture(scope="module")
def sd_with_loras(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora_cache")
    pipe = ModularPipeline.from_pretrained(str(write_tiny_sd(root / "ckpt")))
    pipe.load_components(dtype=torch.float32)
    for seed, name in enumerate(("a", "b", "c")):
        write_lora_file(root / f"{name}.safetensors",
                        *random_lora({"unet": pipe.unet}, rank=2, seed=seed))
    (root / "broken.safetensors").write_bytes(b"not a safetensors file")
    models = parse_models(_models(root, {name: {"source": f"./{name}.safetensors"}
                                         for name in ("a", "b", "c", "broken")}), root)
    return pipe, models.models["m"].loras


def test_the_cache_loads_on_first_use_and_evicts_the_least_recently_used_idle(sd_with_loras):
    pipe, entries = sd_with_loras
    events = []
    cache = LoraCache("m", entries, PipelineLoraLoader(pipe), capacity=2,
                      observer=lambda event, model, lora: events.append((event, lora)))
    with cache.using(["a"]):
        assert pipe.get_list_adapters() == {"unet": ["a"]}
    with cache.using(["b"]):
        pass
    with cache.using(["a"]):  # a is now the most recently used
        pass
    with cache.using(["c"]):  # room for c: b goes, not a
        assert cache.loaded == ["a", "c"]
        assert pipe.get_list_adapters() == {"unet": ["a", "c"]}
    assert [e for e in events if e[0] != "request"] == [
        ("load", "a"), ("load", "b"), ("evict", "b"), ("load", "c")]  # room first
    assert events.count(("request", "a")) == 2

    # Adapters in use are never unloaded: the cache holds more, then shrinks back.
    with cache.using(["a", "c"]), cache.using(["b"]):
        assert sorted(cache.loaded) == ["a", "b", "c"]
    assert len(cache.loaded) == 2
    assert cache.describe() == [{"name": name, "scale": 1.0, "loaded": name in cache.loaded}
                                for name in ("a", "b", "c", "broken")]

    with pytest.raises(LoraLoadError, match="lora 'broken' of model 'm' failed to load"), \
            cache.using(["a", "broken"]):
        pass
    with cache.using(["b"]):  # nothing stayed pinned by the failed request
        assert len(cache.loaded) == 2


def test_http_requests_choose_adapters_by_name(sd_with_loras, tmp_path):
    """Through the app and the openai client's `extra_body`: adapters change the image, a
    request without any gets the base image, an adapter unloaded to make room and loaded again
    gives the same bytes, an unknown name is a 400 listing the allowed ones; /v1/models/{id}
    and /metrics show them."""
    root = Path(sd_with_loras[1]["a"].source).parent
    models = parse_models({"models": {"m": {
        "family": "sd", "path": "./ckpt", "sizes": ["32x32"], "max_loaded_loras": 1,
        "defaults": {"steps": 2, "size": "32x32"},
        "loras": {"a": {"source": "./a.safetensors", "scale": 0.8},
                  "b": {"source": "./b.safetensors"}}}}}, root)
    app = create_app(Settings(models_file=tmp_path / "unused.yaml"), models)
    with TestClient(app) as http:
        wait_ready(http)
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)

        def image(loras: list | None) -> str:
            extra = {"seed": 3, **({"loras": loras} if loras is not None else {})}
            return client.images.generate(model="m", prompt="a ring",
                                          extra_body=extra).data[0].b64_json

        base = image(None)
        first_a, b = image([{"name": "a"}]), image([{"name": "b", "scale": 1.5}])
        assert len({base, first_a, b}) == 3
        assert image([{"name": "a"}]) == first_a  # a was unloaded for b, then loaded again
        assert image([]) == base  # loaded adapters don't touch requests without any

        with pytest.raises(BadRequestError) as caught:
            image([{"name": "../a.safetensors"}])
        assert caught.value.body["message"] == ("lora '../a.safetensors' is not available for "
                                                "model 'm'; available: a, b")
        assert caught.value.body["param"] == "loras[0].name"

        detail = http.get("/v1/models/m").json()
        assert detail["loras"] == [{"name": "a", "scale": 0.8, "loaded": True},
                                   {"name": "b", "scale": 1.0, "loaded": False}]
        assert detail["max_loaded_loras"] == 1
        metrics = http.get("/metrics").text
        for line in ('blockserve_lora_requests_total{lora="a",model="m"} 2.0',
                     'blockserve_lora_loads_total{lora="a",model="m"} 2.0',
                     'blockserve_lora_evictions_total{lora="a",model="m"} 1.0',
                     'blockserve_lora_evictions_total{lora="b",model="m"} 1.0'):
            assert line in metrics
