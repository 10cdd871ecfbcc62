"""The shared weight pool on a local Ray cluster (2 CPUs, loopback): two models whose VAEs are
byte-identical share one pool entry loaded once, FLUX.2 [klein] runs on pooled weights with
embedded mode's pixels, idle components are offloaded and come back
from the pool (not from disk), a Denoiser replica killed under load gives 200s or clean 503s
and the service recovers, and a restarted registry rebuilds its state.

One Serve application (module-scoped) serves every test; the tests run in file order.
"""

from __future__ import annotations

import base64
import collections
import io
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install '.[ray]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from blocks.flux2.tiny_model import write_tiny_flux2_klein  # noqa: E402
from blocks.stable_diffusion.tiny_model import write_tiny_sd  # noqa: E402
from deployments.weight_pool import (  # noqa: E402
    REGISTRY_NAME,
    REGISTRY_NAMESPACE,
    registry_stats,
)
from tests.integration.conftest import local_serve_app  # noqa: E402

IDLE_OFFLOAD_S = 3.0
HEARTBEAT_S = 0.5
MODELS_YAML = """
models:
  first:
    family: sd
    path: {first}
    defaults: {{steps: 2, guidance_scale: 5.0, size: 32x32}}
    limits: {{max_steps: 4, max_n: 2}}
  second:
    family: sd
    path: {second}
    defaults: {{steps: 2, guidance_scale: 5.0, size: 32x32}}
    limits: {{max_steps: 4, max_n: 2}}
  flux:
    family: flux2-klein
    path: {flux}
    defaults: {{steps: 2, size: 32x32}}
"""


@pytest.fixture(scope="module")
def pool_app(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("pool")
    first, second = folder / "first", folder / "second"
    write_tiny_sd(first, seed=0)
    write_tiny_sd(second, seed=1)  # other text encoder and UNet weights ...
    shutil.rmtree(second / "vae")
    shutil.copytree(first / "vae", second / "vae")  # ... and a byte-identical VAE
    models_file = folder / "models.yaml"
    write_tiny_flux2_klein(folder / "flux")
    models_file.write_text(MODELS_YAML.format(first=first, second=second, flux=folder / "flux"))
    args = {"models_file": str(models_file), "concurrency": 8,
            "weight_pool": {"idle_offload_s": IDLE_OFFLOAD_S, "heartbeat_s": HEARTBEAT_S},
            "deployments": [{"name": "Denoiser", "num_replicas": 2,
                             "ray_actor_options": {"num_cpus": 0.5}}]}
    with local_serve_app(args) as url:
        yield {"url": url, "args": args, "models_file": models_file,
               "vae": serve.get_deployment_handle("VAE", app_name="blockserve")}


def _generate(url: str, model: str, seed: int, timeout: float = 120) -> httpx.Response:
    body = {"model": model, "prompt": f"a shape {seed}", "seed": seed, "size": "32x32"}
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def _pixels(response: httpx.Response) -> np.ndarray:
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)))


def _stats() -> dict:
    stats = registry_stats(timeout_s=10)
    assert stats is not None, "the registry does not answer"
    return stats


def _vae_entries(stats: dict) -> list[dict]:
    """The SD models' VAE entries (FLUX.2's VAE is another class, another entry)."""
    return [e for e in stats["entries"] if {"first/vae", "second/vae"} & set(e["users"])]


def _sd_entries(stats: dict) -> list[dict]:
    return [e for e in stats["entries"]
            if any(user.startswith(("first/", "second/")) for user in e["users"])]


def _live_replicas() -> set[str]:
    """Ids of the live TextEncoder, Denoiser and VAE replicas (from their actor names)."""
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    return {name.rsplit("#", 1)[-1] for name in names
            if name.startswith("SERVE_REPLICA::") and "#Router#" not in name}


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_byte_identical_vaes_are_one_entry_loaded_once(pool_app) -> None:
    for model in ("first", "second"):
        assert _generate(pool_app["url"], model, 1).status_code == 200
    stats = _stats()
    vaes = _vae_entries(stats)
    assert len(vaes) == 1, vaes
    assert sorted(vaes[0]["users"]) == ["first/vae", "second/vae"]
    # text encoders and UNets differ by seed: 2 + 2 entries, plus the one VAE; each loaded
    # once although two Denoiser replicas and two models asked for them. FLUX.2 adds 3.
    assert len(_sd_entries(stats)) == 5
    assert stats["loads"] == stats["misses"] == len(stats["entries"]) == 8
    assert stats["hits"] >= 2  # the second VAE, and the second Denoiser replica's UNets
    # The node holds each entry's bytes once.
    assert sum(stats["pool_bytes_by_node"].values()) == sum(e["bytes"] for e in stats["entries"])


def test_model_detail_and_metrics_show_the_pool(pool_app) -> None:
    detail = httpx.get(f"{pool_app['url']}/v1/models/second", timeout=30).json()
    weights = detail["placement"]["weights"]
    assert weights["components"]["vae"]["shared_with"] == ["first/vae"]
    assert set(weights["components"]) == {"text_encoder", "unet", "vae"}
    assert weights["loads"] == 8
    metrics = httpx.get(f"{pool_app['url']}/metrics", timeout=30).text
    assert "blockserve_pool_entries 8.0" in metrics
    assert "blockserve_pool_loads_total 8.0" in metrics
    assert "blockserve_pool_resident_bytes{" in metrics


def test_flux2_klein_on_the_pool_gives_the_embedded_pixels(pool_app) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    body = {"model": "flux", "prompt": "a red fox", "seed": 4, "size": "32x32"}
    got = httpx.post(f"{pool_app['url']}/v1/images/generations", json=body, timeout=120)
    assert got.status_code == 200, got.text
    settings = Settings.from_env(models_file=pool_app["models_file"], api_keys="")
    with TestClient(create_app(settings)) as client:
        _wait_for(lambda: client.get("/readyz").status_code == 200, 120, "the embedded app")
        expected = client.post("/v1/images/generations", json=body)
    assert expected.status_code == 200, expected.text
    assert np.array_equal(_pixels(got), _pixels(expected))


def test_idle_components_are_offloaded_and_come_back_from_the_pool(pool_app) -> None:
    url = pool_app["url"]
    before = _pixels(_generate(url, "first", 7))
    vae_entry = _vae_entries(_stats())[0]["entry"]
    # Nothing runs now: after the idle time every replica has dropped the VAE.
    _wait_for(lambda: not _vae_entries(_stats())[0]["resident"], IDLE_OFFLOAD_S + 10,
              "the idle VAE to be offloaded")
    info = pool_app["vae"].info.remote().result()
    assert not info["weights"]["first/vae"]["resident"]
    stats = _stats()
    assert stats["offloads"] >= 1
    assert not any(vae_entry in replica["resident"] for replica in stats["replicas"].values())
    loads, hits = stats["loads"], stats["hits"]

    again = _generate(url, "first", 7)
    assert again.status_code == 200
    assert np.array_equal(_pixels(again), before)  # same weights back
    stats = _stats()
    assert stats["loads"] == loads  # from the pool, not from disk
    assert stats["hits"] > hits


def test_killing_a_denoiser_replica_under_load(pool_app) -> None:
    url = pool_app["url"]
    loads = _stats()["loads"]
    replicas = [name for name in ray.util.list_named_actors(all_namespaces=True)
                if "Denoiser" in name["name"] and "REPLICA" in name["name"].upper()]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])

    timeout = 90.0

    def request(seed: int) -> tuple[int, float, str]:
        start = time.monotonic()
        try:
            response = _generate(url, "first" if seed % 2 else "second", seed, timeout=timeout)
        except httpx.TimeoutException:
            return -1, time.monotonic() - start, "hung"
        return response.status_code, time.monotonic() - start, response.headers.get(
            "retry-after", "")

    with ThreadPoolExecutor(20) as executor:
        futures = [executor.submit(request, seed) for seed in range(100, 120)]
        time.sleep(0.5)  # requests are in flight
        ray.kill(victim, no_restart=True)
        outcomes = [future.result() for future in futures]
    codes = [code for code, _, _ in outcomes]
    print(f"replica killed under load: {collections.Counter(codes)}, slowest "
          f"{max(seconds for _, seconds, _ in outcomes):.1f} s")
    assert set(codes) <= {200, 503}, outcomes
    assert all(seconds < timeout for _, seconds, _ in outcomes)
    assert all(retry for code, _, retry in outcomes if code == 503), outcomes

    # Serve replaces the replica; the service answers 200 again within 60 s.
    _wait_for(lambda: _generate(url, "first", 3, timeout=30).status_code == 200, 60,
              "a 200 after the replica died")
    # The registry outlived the replica: its entries stay valid, nothing was loaded again.
    assert _stats()["loads"] == loads


def test_a_restarted_registry_rebuilds_its_state(pool_app) -> None:
    url = pool_app["url"]
    expected = _pixels(_generate(url, "second", 9))
    old = _stats()
    registry = ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
    ray.kill(registry, no_restart=False)  # it crashes; Ray restarts it

    def rebuilt() -> dict | None:
        stats = registry_stats(timeout_s=5)
        if stats is None or stats["started"] == old["started"]:
            return None
        # The replicas' heartbeats have told it who they are and what they hold.
        return stats if set(stats["replicas"]) == _live_replicas() else None

    stats = _wait_for(rebuilt, 60, "the registry to restart and hear every replica")
    assert stats["loads"] == 0 and not stats["entries"]  # the old copies died with it
    # Modules built before the restart keep working and give the same image, and the new
    # registry hears what the replicas hold.
    again = _generate(url, "second", 9)
    assert again.status_code == 200
    assert np.array_equal(_pixels(again), expected)
    # Once idle, the VAE is dropped; using it again acquires it from the new registry, which
    # loads it once for both models (and each other entry at most once).
    _wait_for(lambda: not any(len(r["resident"]) for r in _stats()["replicas"].values()),
              IDLE_OFFLOAD_S + 10, "every replica to go idle")
    for model in ("first", "second", "first"):
        assert _generate(url, model, 10).status_code == 200
    # A replica that Serve was still replacing may be loading FLUX.2's entries meanwhile: read
    # the counts when no load is in flight (its miss counts before its load finishes).
    stats = _wait_for(lambda: (snapshot := _stats())["loading"] == 0 and snapshot, 60,
                      "the pool's loads in flight to finish")
    assert len(_vae_entries(stats)) == 1
    assert sorted(_vae_entries(stats)[0]["users"]) == ["first/vae", "second/vae"]
    assert len(_sd_entries(stats)) == 5
    # Each entry loaded once.
    assert stats["loads"] == stats["misses"] == len(stats["entries"])
    assert stats["hits"] >= 2


def test_a_full_deployment_queue_answers_503_with_retry_after(pool_app) -> None:
    from service.ray_placement import build_app

    # Redeploy the VAE to take one call and queue one more; the router sends up to 8.
    args = dict(pool_app["args"])
    args["deployments"] = [*args["deployments"],
                           {"name": "VAE", "max_ongoing_requests": 1, "max_queued_requests": 1}]
    serve.run(build_app(args), name="blockserve", route_prefix="/")
    url = pool_app["url"]
    with ThreadPoolExecutor(12) as executor:
        responses = list(executor.map(lambda seed: _generate(url, "first", seed, timeout=60),
                                      range(200, 212)))
    codes = collections.Counter(response.status_code for response in responses)
    print(f"VAE queue of 1 under 12 concurrent requests: {codes}")
    assert set(codes) <= {200, 503} and codes[503] >= 1, codes
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert "VAE unavailable: queue full" in error["message"], error
