"""The batching engine, job records and previews in-process, on the weight-free demo model.

Jobs submitted before `start()` are all queued when the worker first looks, which makes "these
run as one batch" deterministic; a listener that cancels from inside `progress` makes "stopped
at step k" deterministic too.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import pytest
import torch
from PIL import Image

from blocks import GenerationCancelled
from service.batch import batch_inputs, run_batch
from service.engine import BatchingEngine, EngineStopped, QueueFull
from service.fault_injection import InjectedFault, fault_injection_hook
from service.job_store import JobRecord, JobStore
from service.jobs import TIMEOUT, GenerationJob, GenerationTimedOut
from service.latent_rgb import PIXELS, LatentRGB
from service.models_file import parse_models
from service.registry import ModelRegistry
from service.routes.images import partial_steps

MODELS = {"models": {"demo": {"family": "demo", "defaults": {"steps": 3, "size": "32x32"},
                              "sizes": ["32x32", "64x64"],
                              "limits": {"max_steps": 100, "max_n": 4}}}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    registry = ModelRegistry(parse_models(MODELS, tmp_path_factory.mktemp("models")))
    registry.load("demo")
    return registry


def job(prompt: str = "red", seed: int = 0, n: int = 1, steps: int = 3, size: int = 32,
        **fields: object) -> GenerationJob:
    return GenerationJob(model="demo", workflow="text2image", prompt=prompt, n=n, width=size,
                         height=size, steps=steps, seed=seed, **fields)  # type: ignore[arg-type]


class Recorder:
    """A job listener that records what it is told, and can cancel its job at a step."""

    def __init__(self, cancel_at: int | None = None, engine: BatchingEngine | None = None):
        self.events: list[tuple] = []
        self.cancel_at, self.engine, self.job = cancel_at, engine, None

    def queued(self, position: int) -> None:
        self.events.append(("queued", position))

    def started(self) -> None:
        self.events.append(("started",))

    def progress(self, step: int, total: int, previews: list[Image.Image] | None) -> None:
        self.events.append(("progress", step, total, previews))
        if step == self.cancel_at:
            self.engine.cancel(self.job)


class Observer:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.batches: list[int] = []
        self.stopped: list[tuple[str, str]] = []

    def job_started(self, model: str, queue_seconds: float) -> None:
        self.waits.append(queue_seconds)

    def batch_started(self, model: str, images: int) -> None:
        self.batches.append(images)

    def job_stopped(self, model: str, reason: str, stage: str) -> None:
        self.stopped.append((reason, stage))


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


def alone(registry: ModelRegistry, template: GenerationJob) -> list[bytes]:
    fresh = job(template.prompt, template.seed, template.n, template.steps, template.width,
                negative_prompt=template.negative_prompt)
    outcome = run_batch(registry.get("demo"), [fresh])[0]
    assert not isinstance(outcome, Exception)
    return [pixels(image) for image in outcome.images]


def results(futures: list[Future]) -> list:
    return [future.result(timeout=30) for future in futures]


# -- batching ----------------------------------------------------------------------------------


def test_compatible_jobs_run_as_one_call_and_each_image_is_unchanged(registry):
    observer = Observer()
    engine = BatchingEngine(registry, max_batch_size=8, observer=observer)
    jobs = [job("red", 1), job("green", 2, n=2), job("a blue sky", 3), job("purple", 9, n=3)]
    futures = [engine.submit(j) for j in jobs]
    engine.start()
    try:
        outcomes = results(futures)
    finally:
        engine.stop()
    assert observer.batches == [7]
    assert all(o.batch_size == 7 for o in outcomes)
    for j, outcome in zip(jobs, outcomes, strict=True):
        assert outcome.seeds == j.seeds
        assert [pixels(image) for image in outcome.images] == alone(registry, j)


def test_batch_inputs_keep_one_generator_per_image_in_job_order(registry):
    model = registry.get("demo")
    same_n = batch_inputs(model, [job("a", 1, n=2), job("b", 5, n=2)])
    assert same_n["prompt"] == ["a", "b"] and same_n["num_images_per_prompt"] == 2
    mixed = batch_inputs(model, [job("a", 1, n=2), job("b", 5)])
    assert mixed["prompt"] == ["a", "a", "b"] and mixed["num_images_per_prompt"] == 1
    expected = [torch.Generator().manual_seed(s).initial_seed() for s in (1, 2, 5)]
    assert [g.initial_seed() for g in mixed["generator"]] == expected
    assert "negative_prompt" not in mixed  # the demo has no such input


def test_incompatible_jobs_wait_their_turn_and_the_cap_splits_batches(registry):
    observer = Observer()
    engine = BatchingEngine(registry, max_batch_size=3, observer=observer)
    jobs = [job("red", 1, n=2), job("red", 2, size=64), job("red", 3), job("red", 4),
            job("red", 5, n=4)]
    futures = [engine.submit(j) for j in jobs]
    engine.start()
    try:
        results(futures)
    finally:
        engine.stop()
    # The oldest job always goes first, with what fits; n=4 > the cap of 3 runs alone.
    assert observer.batches == [3, 1, 1, 4]


def test_edits_and_different_negative_prompt_presence_never_share_a_batch():
    image = Image.new("RGB", (32, 32))
    plain, edit = job("red"), job("red", image=image, strength=0.5)
    other_edit = job("red", image=image, strength=0.5)
    assert plain.batch_key != edit.batch_key != other_edit.batch_key
    assert job("a").batch_key == job("b", seed=5, n=3).batch_key
    assert job("a").batch_key != job("a", negative_prompt="x").batch_key
    assert job("a", negative_prompt="x").batch_key == job("b", negative_prompt="y").batch_key


def test_an_idle_engine_waits_the_window_for_batch_mates(registry):
    observer = Observer()
    engine = BatchingEngine(registry, batch_window_s=0.3, observer=observer)
    engine.start()
    try:
        first = engine.submit(job("red", 1))
        time.sleep(0.05)
        second = engine.submit(job("blue", 2))
        results([first, second])
    finally:
        engine.stop()
    assert observer.batches == [2]


def test_two_workers_run_two_batches_at_once_on_their_own_pipelines(registry):
    observer = Observer()
    both_running = []
    seen_pipelines = set()

    def hook(jobs, step):  # both jobs are slow: each worker holds one while the other runs
        both_running.append(engine.running)
        seen_pipelines.add(id(registry.get("demo").pipeline(None, 0)))
        time.sleep(0.05)

    engine = BatchingEngine(registry, observer=observer, step_hook=hook, workers=2)
    jobs = [job("red", 1, steps=4), job("blue", 2, steps=4, size=64)]  # incompatible
    futures = [engine.submit(j) for j in jobs]
    engine.start()
    try:
        outcomes = results(futures)
    finally:
        engine.stop()
    assert sorted(observer.batches) == [1, 1]
    assert 2 in both_running  # at some step both batches were running
    for j, outcome in zip(jobs, outcomes, strict=True):
        assert [pixels(image) for image in outcome.images] == alone(registry, j)
    model = registry.get("demo")
    assert model.pipeline(None, 1) is not model.pipeline(None, 0) is model.base
    assert model.pipeline(None, 1) is model.pipeline(None, 1)  # made once per worker


def test_worker_pipelines_share_weights_and_copy_the_rest(tmp_path):
    from blocks.stable_diffusion.tiny_model import write_tiny_sd

    checkpoint = write_tiny_sd(tmp_path / "sd")
    models = parse_models({"models": {"sd": {"family": "sd", "path": str(checkpoint),
                                             "defaults": {"size": "32x32"},
                                             "sizes": ["32x32"]}}}, tmp_path)
    model = ModelRegistry(models).load("sd")
    first, second = model.pipeline(None, 0), model.pipeline(None, 1)
    assert second.unet is first.unet and second.vae is first.vae  # one copy of the weights
    assert second.tokenizer is not first.tokenizer  # not shared between threads
    assert second.scheduler is not first.scheduler  # per-call state (timesteps)
    assert second.scheduler.config == first.scheduler.config
    assert model.pipeline("euler", 1).unet is first.unet
    made = []
    for worker in (0, 1):
        sd_job = GenerationJob(model="sd", workflow="text2image", prompt="a cat", n=1, width=32,
                               height=32, steps=2, seed=3)
        outcome = run_batch(model, [sd_job], worker=worker)[0]
        made.append(pixels(outcome.images[0]))
    assert made[0] == made[1]  # either worker makes the same bytes


def test_workers_must_be_at_least_one(registry):
    with pytest.raises(ValueError, match="workers must be at least 1"):
        BatchingEngine(registry, workers=0)


# -- back-pressure, cancellation, timeouts, failures -------------------------------------------


def test_a_full_queue_raises_queue_full_and_a_cancelled_job_frees_its_slot(registry):
    observer = Observer()
    engine = BatchingEngine(registry, queue_size=2, observer=observer)
    first, second = job("red"), job("blue")
    first_future = engine.submit(first)
    engine.submit(second)
    with pytest.raises(QueueFull) as full:
        engine.submit(job("green"))
    assert full.value.retry_after >= 1
    assert engine.cancel(first) and engine.queued == 1
    with pytest.raises(GenerationCancelled):
        first_future.result(timeout=1)
    assert observer.stopped == [("cancelled", "queued")]
    engine.submit(job("green"))  # the slot is free
    engine.stop()
    with pytest.raises(EngineStopped):
        engine.submit(job("late"))


def test_stop_fails_queued_jobs(registry):
    engine = BatchingEngine(registry)
    future = engine.submit(job("red"))
    engine.stop()
    with pytest.raises(EngineStopped):
        future.result(timeout=1)


def test_cancelling_one_member_leaves_its_batch_mates_running(registry):
    observer = Observer()
    engine = BatchingEngine(registry, observer=observer)
    quitter_listener = Recorder(cancel_at=2, engine=engine)
    quitter = job("red", 1, steps=6, listener=quitter_listener)
    quitter_listener.job = quitter
    stayer_listener = Recorder()
    stayer = job("blue", 2, steps=6, listener=stayer_listener)
    futures = [engine.submit(quitter), engine.submit(stayer)]
    engine.start()
    try:
        with pytest.raises(GenerationCancelled):
            futures[0].result(timeout=30)
        kept = futures[1].result(timeout=30)
    finally:
        engine.stop()
    assert observer.batches == [2]
    assert [e[1] for e in quitter_listener.events if e[0] == "progress"] == [1, 2]
    assert [e[1] for e in stayer_listener.events if e[0] == "progress"] == [1, 2, 3, 4, 5, 6]
    assert [pixels(image) for image in kept.images] == alone(registry, stayer)
    assert observer.stopped == [("cancelled", "running")]


def test_when_every_member_is_cancelled_the_call_stops_at_the_next_step(registry):
    engine = BatchingEngine(registry)
    listener = Recorder(cancel_at=2, engine=engine)
    lone = job("red", steps=50, listener=listener)
    listener.job = lone
    future = engine.submit(lone)
    engine.start()
    try:
        with pytest.raises(GenerationCancelled):
            future.result(timeout=30)
    finally:
        engine.stop()
    assert [e[1] for e in listener.events if e[0] == "progress"] == [1, 2]


def test_a_job_past_its_deadline_times_out_queued_or_running(registry):
    observer = Observer()
    engine = BatchingEngine(registry, observer=observer,
                            step_hook=lambda jobs, step: time.sleep(0.02))
    running = job("red", steps=100, timeout_seconds=0.2)
    queued = job("blue", steps=2, size=64, timeout_seconds=0.1)  # behind `running`
    futures = [engine.submit(running), engine.submit(queued)]
    engine.start()
    try:
        with pytest.raises(GenerationTimedOut):
            futures[1].result(timeout=30)
        with pytest.raises(GenerationTimedOut) as stopped:
            futures[0].result(timeout=30)
    finally:
        engine.stop()
    assert 0 < stopped.value.step < 100
    assert sorted(observer.stopped) == [(TIMEOUT, "queued"), (TIMEOUT, "running")]


def test_a_failing_member_is_isolated_by_running_each_alone(registry):
    observer = Observer()
    engine = BatchingEngine(registry, observer=observer, step_hook=fault_injection_hook)
    jobs = [job("red", 1), job("green [[fail]]", 2), job("blue", 3)]
    futures = [engine.submit(j) for j in jobs]
    engine.start()
    try:
        with pytest.raises(InjectedFault):
            futures[1].result(timeout=30)
        good = [futures[0].result(timeout=30), futures[2].result(timeout=30)]
    finally:
        engine.stop()
    assert observer.batches == [3, 1, 1, 1]  # the batch, then each alone
    for j, outcome in zip((jobs[0], jobs[2]), good, strict=True):
        assert [pixels(image) for image in outcome.images] == alone(registry, j)


# -- records, store and previews ---------------------------------------------------------------


def test_job_record_events_are_ordered_and_keep_only_the_newest_progress():
    record = JobRecord(job("red", steps=4))
    record.queued(2)
    record.started()
    loop = asyncio.new_event_loop()
    try:
        history, queue = record.subscribe(loop)
        for step in (1, 2, 3):
            record.progress(step, 4, None)
        record.succeed({"data": []})
        record.fail({"message": "ignored: already finished"})
        loop.run_until_complete(asyncio.sleep(0))
        live = [queue.get_nowait() for _ in range(queue.qsize())]
    finally:
        loop.close()
    assert [e.type for e in history] == ["queued", "started"]
    assert [e.type for e in live] == ["progress", "progress", "progress", "completed"]
    assert [e.seq for e in history + live] == [1, 2, 3, 4, 5, 6]
    late, none = record.subscribe(asyncio.new_event_loop())
    assert none is None
    assert [e.type for e in late] == ["queued", "started", "progress", "completed"]
    assert late[2].data["step"] == 3
    status = record.status()
    assert status["status"] == "succeeded" and status["step"] == 3
    assert status["result"] == {"data": []} and status["error"] is None


def test_job_store_forgets_finished_jobs_by_age_and_count(monkeypatch):
    store = JobStore(ttl_seconds=10, max_finished=2)
    records = [JobRecord(job(str(i))) for i in range(4)]
    for record in records:
        store.add(record)
    for index, record in enumerate(records[:3]):
        record.succeed({})
        record.finished_at = 100.0 + index
    monkeypatch.setattr(time, "monotonic", lambda: 105.0)
    assert store.get(records[0].id) is None  # the oldest of three finished
    assert store.get(records[1].id) is not None and store.get(records[3].id) is not None
    monkeypatch.setattr(time, "monotonic", lambda: 111.5)
    assert store.get(records[1].id) is None and store.get(records[2].id) is not None
    assert store.get(records[3].id) is not None  # never finished: kept


def test_partial_image_steps_are_spread_and_before_the_last():
    assert partial_steps(6, 2) == {2, 4}
    assert partial_steps(4, 3) == {1, 2, 3}
    assert partial_steps(2, 3) == {1}
    assert partial_steps(10, 0) == set()


def test_latent_previews():
    weights = torch.tensor([[0.35, 0.23, 0.32], [0.33, 0.50, 0.24], [-0.28, 0.18, 0.27],
                            [-0.21, -0.26, -0.72]])
    images = LatentRGB(weights, torch.zeros(3)).images(torch.zeros(2, 4, 8, 6))
    assert [image.size for image in images] == [(6, 8), (6, 8)]
    assert images[0].getpixel((0, 0)) == (128, 128, 128)  # zero latents: mid grey
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert PIXELS.images(red)[0].getpixel((0, 0)) == (255, 0, 0)
    assert PIXELS.images(torch.zeros(1, 16, 64)) is None  # packed tokens
    assert PIXELS.images(torch.zeros(1, 16, 4, 4)) is None  # another channel count
