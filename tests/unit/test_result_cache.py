"""The exact-repeat result cache: a repeat gets the same bytes without running, the byte bound
holds (least recently used dropped first), 0 turns it off, and the app counts hits."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.jobs import GenerationJob, GenerationResult
from service.models_file import parse_models
from service.result_cache import ResultCache, job_key
from service.settings import Settings

DEMO = {"models": {"demo": {"family": "demo", "defaults": {"steps": 2, "size": "32x32"}}}}


def _job(seed: int = 1, **fields) -> GenerationJob:
    return GenerationJob(model="m", workflow="text2image", prompt="red", n=1, width=8,
                         height=8, steps=2, seed=seed, **fields)


def _result(colour: tuple[int, int, int]) -> GenerationResult:
    return GenerationResult([Image.new("RGB", (8, 8), colour)], [1], 0.5)  # 192 bytes


def test_hits_return_the_stored_pixels_within_the_byte_bound() -> None:
    cache = ResultCache(max_bytes=2 * 192)
    cache.put(_job(1), _result((255, 0, 0)))
    cache.put(_job(2), _result((0, 255, 0)))
    hit = cache.get(_job(1))  # a new job object with the same inputs; now most recent
    assert hit is not None and hit.images[0].tobytes() == _result((255, 0, 0)).images[0].tobytes()
    assert cache.get(_job(1, negative_prompt="blue")) is None  # any input counts
    cache.put(_job(3), _result((0, 0, 255)))  # over the bound: seed 2, least recent, goes
    assert cache.get(_job(2)) is None and cache.get(_job(1)) is not None
    assert (len(cache), cache.nbytes) == (2, 2 * 192)
    # Input images are keyed by their pixels.
    red, also_red = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), (255, 0, 0))
    assert job_key(_job(image=red)) == job_key(_job(image=also_red)) != job_key(_job())

    off = ResultCache(max_bytes=0)
    off.put(_job(1), _result((255, 0, 0)))
    assert off.get(_job(1)) is None and len(off) == 0


def test_the_app_answers_an_exact_repeat_from_the_cache(tmp_path: Path) -> None:
    app = create_app(Settings(models_file=tmp_path / "unused.yaml", result_cache_bytes=2**20),
                     parse_models(DEMO, tmp_path))
    body = {"model": "demo", "prompt": "red", "seed": 1}
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = client.post("/v1/images/generations", json=body).json()
        again = client.post("/v1/images/generations", json=body).json()
        other = client.post("/v1/images/generations", json={**body, "seed": 2}).json()
        metrics = client.get("/metrics").text
    assert again["data"] == first["data"] != other["data"]
    assert 'blockserve_result_cache_lookups_total{model="demo",result="hit"} 1.0' in metrics
    assert 'blockserve_result_cache_lookups_total{model="demo",result="miss"} 2.0' in metrics
    assert "blockserve_result_cache_bytes 6144.0" in metrics  # two 32x32 RGB images
