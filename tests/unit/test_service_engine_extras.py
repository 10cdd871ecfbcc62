"""The engine with per-job LoRA adapters and step caching on tiny SD: jobs with different
adapters, scales, step-cache methods or none share the step scheduler's forwards (one joining
mid-loop), and each job's images are the bytes it gets alone; adapters stay pinned while a job
runs."""

from __future__ import annotations

import pickle
import time
from concurrent.futures import Future

import pytest
from diffusers import UNet2DConditionModel

from blocks.lora import write_lora_file
from blocks.lora.tiny_lora import random_lora
from blocks.stable_diffusion.tiny_model import write_tiny_sd
from blocks.step_cache import step_cache_config
from deployments.step_scheduler import TaskOptions
from service.engine import Engine, run_job
from service.jobs import GenerationJob
from service.metrics import ServiceMetrics
from service.models_file import parse_models
from service.placement import LocalRunner
from service.registry import ModelRegistry
from tests.unit.test_service_engine import Observer, Recorder

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("engine_extras")
    path = write_tiny_sd(root / "ckpt")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    for seed, name in enumerate("ab"):
        write_lora_file(root / f"{name}.safetensors",
                        *random_lora({"unet": unet}, rank=4, alpha=8, seed=seed))
    models = parse_models({"models": {"m": {
        "family": "sd", "path": "./ckpt", "sizes": ["32x32"], "max_loaded_loras": 2,
        "defaults": {"steps": 4, "size": "32x32"},
        "loras": {"a": {"source": "./a.safetensors"}, "b": {"source": "./b.safetensors"}}}}},
        root)
    registry = ModelRegistry(models)
    registry.load("m")
    return registry


def job(seed: int, steps: int = 4, loras=(), cache=None, **fields) -> GenerationJob:
    return GenerationJob(model="m", workflow="text2image", prompt=f"a ring {seed}", n=1,
                         width=32, height=32, steps=steps, seed=seed, guidance_scale=5.0,
                         loras=loras, step_cache=step_cache_config(cache),
                         **fields)  # type: ignore[arg-type]


def image(outcome) -> bytes:
    return outcome.images[0].tobytes()


def test_jobs_with_own_adapters_and_step_caches_share_steps_and_keep_their_bytes(registry):
    deep = {"method": "deepcache", "interval": 2}
    jobs = [job(1, loras=(("a", 1.0),)),
            job(2, steps=5, loras=(("a", 0.4), ("b", 1.3))),
            job(3),
            job(4, cache=deep),
            job(5, steps=3, loras=(("b", 0.7),), cache=deep)]
    late: list[Future] = []
    late_job = job(6, steps=3, loras=(("b", 1.0),), cache={"method": "deepcache", "interval": 3})
    observer = Observer()
    engine = Engine(registry, LocalRunner(), observer=observer)

    def submit_late() -> None:  # on the worker, after job 1's step 1: joins mid-loop
        late.append(engine.submit(late_job))
        deadline = time.monotonic() + 10
        while engine.running < len(jobs) + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)

    jobs[0].listener = Recorder(at=1, action=submit_late)
    futures = [engine.submit(j) for j in jobs]
    engine.start()
    try:
        outcomes = [future.result(timeout=120) for future in futures]
        late_outcome = late[0].result(timeout=120)
    finally:
        engine.stop()
    # The first step: jobs 1-3 (adapters a, a+b, none) in one UNet call, 4 and 5 (deepcache,
    # adapter b or none) in one full sub-forward; at their second, in one cached sub-forward.
    assert observer.forwards[:2] == [3, 2] and 2 in observer.forwards[2:]
    assert late_outcome.batch_size > 1  # the late job shared steps
    for j, outcome in zip([*jobs, late_job], [*outcomes, late_outcome], strict=True):
        fresh = job(j.seed, j.steps, j.loras, j.step_cache)
        assert image(outcome) == image(run_job(registry, fresh)), f"job {j.seed} differs"
    # The adapters and the cache changed the images: each job is its own image.
    assert len({image(outcome) for outcome in outcomes}) == len(outcomes)
    plain = run_job(registry, job(1))
    assert image(plain) != image(outcomes[0])


def test_step_cache_metric_counts_each_requests_full_and_cached_steps(registry):
    """deepcache with interval N runs a request's UNet fully every N steps (its first
    included) and skips the deep part otherwise: ceil(steps / N) full, the rest cached. The
    jobs share steps; a job without caching is not counted."""
    metrics = ServiceMetrics(registry.manager)
    engine = Engine(registry, LocalRunner(), observer=metrics)
    jobs = [job(1, steps=5, cache={"method": "deepcache", "interval": 2}),  # 3 full, 2 cached
            job(2, steps=4, cache={"method": "deepcache", "interval": 3}),  # 2 full, 2 cached
            job(3, steps=6)]
    futures = [engine.submit(j) for j in jobs]
    engine.start()
    try:
        assert all(future.result(timeout=120).batch_size > 1 for future in futures)
    finally:
        engine.stop()

    def forwards(kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            "blockserve_step_cache_forwards_total",
            {"model": "m", "method": "deepcache", "kind": kind})

    assert (forwards("full"), forwards("cached")) == (5, 4)
    assert metrics.registry.get_sample_value("blockserve_denoise_steps_total",
                                             {"model": "m"}) == 5 + 4 + 6
    uncached = ServiceMetrics(registry.manager)
    run_engine = Engine(registry, LocalRunner(), observer=uncached)
    run_engine.start()
    try:
        run_engine.submit(job(4)).result(timeout=120)
    finally:
        run_engine.stop()
    assert "blockserve_step_cache_forwards_total{" not in uncached.render().decode()


def test_task_options_carry_adapters_and_step_cache_to_a_replica():
    """A Denoiser replica's scheduler gets them by value (Ray pickles the options)."""
    options = TaskOptions(pool=("m", 32, 32), adapters=(("a", 0.5),),
                          step_cache=step_cache_config({"method": "deepcache", "interval": 2}))
    copy = pickle.loads(pickle.dumps(options))
    assert copy == options
    extras = copy.loop_extras(total=7)
    assert extras["loras"] == {"a": 0.5} and extras["step_cache"].total == 7
    assert TaskOptions(pool=None).loop_extras(total=7) == {}
