"""Step caching in the service: the models file's default, the request's `step_cache` field
(400 naming the allowed values), and `/v1/models/{id}` listing the methods."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from blocks.stable_diffusion.tiny_model import write_tiny_sd
from service.app import create_app
from service.models_file import ModelsFileError, parse_models
from service.settings import Settings

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def test_the_models_file_names_a_bad_step_cache(tmp_path: Path) -> None:
    models = {"models": {"demo": {"family": "demo", "step_cache": {"method": "deepcach"}}}}
    with pytest.raises(ModelsFileError, match=r"models\.demo\.step_cache.*unknown method "
                                              r"'deepcach'; allowed: off, fbcache, teacache, "
                                              r"deepcache"):
        parse_models(models, tmp_path)


def test_requests_choose_the_step_cache_and_the_model_card_lists_it(tmp_path: Path) -> None:
    models = {"models": {"sd": {
        "family": "sd", "path": str(write_tiny_sd(tmp_path / "sd")),
        "defaults": {"steps": 4, "size": "32x32"},
        "step_cache": {"method": "deepcache", "interval": 2}}}}
    app = create_app(Settings(models_file=tmp_path / "unused.yaml"),
                     parse_models(models, tmp_path))
    body = {"prompt": "a red circle", "seed": 5}
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        card = client.get("/v1/models/sd").json()
        default = client.post("/v1/images/generations", json=body)
        named = client.post("/v1/images/generations", json={**body, "step_cache": "deepcache"})
        off = client.post("/v1/images/generations", json={**body, "step_cache": "off"})
        wrong = client.post("/v1/images/generations", json={**body, "step_cache": "fbcache"})
    assert card["step_cache"] == {"methods": ["deepcache"],
                                  "default": {"method": "deepcache", "interval": 2, "branch": 1}}
    assert wrong.status_code == 400
    error = wrong.json()["error"]
    assert error["param"] == "step_cache"
    assert "unknown method 'fbcache'; allowed: off, deepcache" in error["message"]

    def pixels(response) -> bytes:
        assert response.status_code == 200, response.text
        return base64.b64decode(response.json()["data"][0]["b64_json"])

    # The default (interval 2) and a named method (its default interval, 3) skip different
    # steps; off runs every step fully.
    assert len({pixels(default), pixels(named), pixels(off)}) == 3
