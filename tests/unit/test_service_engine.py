"""The engine in-process, embedded placement, on the weight-free demo model (and tiny SD where
the weights matter): step-level batching that changes no image, pools and caps, request-level
scheduling, back-pressure, cancellation, timeouts, failure isolation, job records, previews.

Jobs submitted before `start()` are all queued when the engine first looks, which makes "these
start together" deterministic; a listener that acts from inside `progress` (cancels, submits)
makes "at step k" deterministic up to one step.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import pytest
import torch
from PIL import Image

from blocks import GenerationCancelled
from blocks.latent_rgb import PIXELS, LatentRGB
from service.engine import Engine, EngineStopped, QueueFull, run_job
from service.fault_injection import InjectedFault, fault_injection_hook
from service.job_store import JobRecord, JobStore
from service.jobs import TIMEOUT, GenerationJob, GenerationTimedOut
from service.models_file import parse_models
from service.placement import LocalRunner
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
    """A job listener that records what it is told, and can act at a step."""

    def __init__(self, at: int | None = None, action=None):
        self.events: list[tuple] = []
        self.at, self.action = at, action

    def queued(self, position: int) -> None:
        self.events.append(("queued", position))

    def started(self) -> None:
        self.events.append(("started",))

    def progress(self, step: int, total: int, previews: list[Image.Image] | None) -> None:
        self.events.append(("progress", step, total, previews))
        if step == self.at:
            self.action()

    @property
    def steps(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "progress"]


class Observer:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.forwards: list[int] = []
        self.images: list[int] = []
        self.steps = 0
        self.blocks: list[str] = []
        self.stopped: list[tuple[str, str]] = []

    def job_started(self, model: str, queue_seconds: float) -> None:
        self.waits.append(queue_seconds)

    def denoise_step(self, model: str, report) -> None:
        self.steps += 1
        self.forwards += report.forwards
        if report.images:
            self.images.append(report.images)

    def block_finished(self, model: str, block: str, seconds: float) -> None:
        self.blocks.append(block)

    def job_stopped(self, model: str, reason: str, stage: str) -> None:
        self.stopped.append((reason, stage))


def engine(registry, observer=None, workers=1, **options) -> Engine:
    return Engine(registry, LocalRunner(workers=workers), observer=observer, **options)


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


def alone(registry: ModelRegistry, template: GenerationJob) -> list[bytes]:
    fresh = job(template.prompt, template.seed, template.n, template.steps, template.width)
    return [pixels(image) for image in run_job(registry, fresh).images]


def results(futures: list[Future]) -> list:
    return [future.result(timeout=30) for future in futures]


# -- step-level batching -----------------------------------------------------------------------


def test_jobs_with_different_steps_and_n_share_steps_and_each_image_is_unchanged(registry):
    observer = Observer()
    eng = engine(registry, observer)
    jobs = [job("red", 1, steps=3), job("green", 2, n=2, steps=9), job("a blue sky", 3, steps=5),
            job("purple", 9, n=3, steps=4)]
    futures = [eng.submit(j) for j in jobs]
    eng.start()
    try:
        outcomes = results(futures)
    finally:
        eng.stop()
    assert max(observer.forwards) == 4  # the four shared their first steps' forward
    assert max(observer.images) == 7
    assert observer.steps == 3 + 9 + 5 + 4  # one report per job and step
    assert set(observer.blocks) == {"text_encoder", "denoise", "decode"}
    for j, outcome in zip(jobs, outcomes, strict=True):
        assert outcome.seeds == j.seeds and outcome.batch_size == 4
        assert [pixels(image) for image in outcome.images] == alone(registry, j)


def test_pipeline_inputs_give_one_prompt_and_generator_per_image(registry):
    model = registry.get("demo")
    inputs = job("a", 5, n=3).pipeline_inputs(model.accepts)
    assert inputs["prompt"] == ["a", "a", "a"] and inputs["num_images_per_prompt"] == 1
    expected = [torch.Generator().manual_seed(s).initial_seed() for s in (5, 6, 7)]
    assert [g.initial_seed() for g in inputs["generator"]] == expected
    assert "negative_prompt" not in job("a", negative_prompt="x").pipeline_inputs(model.accepts)


def test_a_lone_job_starts_at_once_and_a_later_one_joins_it_mid_loop(registry):
    observer = Observer()
    eng = engine(registry, observer)
    late: list[Future] = []
    later_listener = Recorder()
    later = job("blue", 2, steps=3, listener=later_listener)

    def submit_later() -> None:
        # On the worker, between steps 2 and 3: hold the running job until the engine has
        # admitted the later one and queued its text encoding (which the worker runs before
        # its next step), so that a busy machine's slow engine thread cannot let the first
        # job finish alone.
        late.append(eng.submit(later))
        deadline = time.monotonic() + 10
        while ("started",) not in later_listener.events and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)

    first_listener = Recorder(at=2, action=submit_later)
    first = job("red", 1, steps=12, listener=first_listener)
    eng.start()
    try:
        started = time.monotonic()
        outcome = eng.submit(first).result(timeout=30)
        late_outcome = late[0].result(timeout=30)
    finally:
        eng.stop()
    assert observer.waits[0] < 0.5 and time.monotonic() - started < 10  # no window to wait
    assert late_outcome.batch_size == 2  # it shared steps with the running job
    assert first_listener.steps == list(range(1, 13))
    assert [pixels(i) for i in outcome.images] == alone(registry, first)
    assert [pixels(i) for i in late_outcome.images] == alone(registry, later)


def test_a_short_job_submitted_after_a_long_one_finishes_first(registry):
    eng = engine(registry)
    finished: list[str] = []
    long, short = job("red", 1, steps=40), job("blue", 2, steps=3)
    futures = [eng.submit(long), eng.submit(short)]
    for name, future in zip(("long", "short"), futures, strict=True):
        future.add_done_callback(lambda _, name=name: finished.append(name))
    eng.start()
    try:
        results(futures)
    finally:
        eng.stop()
    assert finished == ["short", "long"]


def test_pools_and_the_cap_decide_who_runs_the_rest_queue_in_order(registry):
    observer = Observer()
    eng = engine(registry, observer, max_batch_size=3)
    jobs = [job("red", 1, n=2, steps=6), job("red", 2, size=64, steps=6), job("red", 3, steps=6),
            job("red", 4, steps=6), job("red", 5, n=4, steps=2)]
    listeners = [Recorder() for _ in jobs]
    for j, listener in zip(jobs, listeners, strict=True):
        j.listener = listener
    finished: list[int] = []
    futures = [eng.submit(j) for j in jobs]
    for index, future in enumerate(futures):
        future.add_done_callback(lambda _, index=index: finished.append(index))
    eng.start()
    try:
        results(futures)
    finally:
        eng.stop()
    assert [listener.events[0] for listener in listeners] == [("queued", i) for i in range(5)]
    # 32x32: the cap of 3 images takes jobs 0 and 2; job 3 waits for room, then job 4 (4
    # images, over the cap) runs alone once its pool is empty. 64x64 is another pool: job 1
    # never waits.
    assert set(observer.images) == {1, 3, 4}
    assert finished.index(3) > max(finished.index(0), finished.index(2))
    assert finished[-1] == 4


def test_request_scheduling_runs_batches_whole_and_nobody_joins_mid_loop(registry):
    observer = Observer()
    eng = engine(registry, observer, scheduling="request")
    late: list[Future] = []
    later_listener = Recorder()
    later = job("blue", 2, steps=3, listener=later_listener)

    def submit_later() -> None:
        # On the worker, between steps 2 and 3: hold the running job until the engine has
        # admitted the later one and queued its text encoding (which the worker runs before
        # its next step), so that a busy machine's slow engine thread cannot let the first
        # job finish alone.
        late.append(eng.submit(later))
        deadline = time.monotonic() + 10
        while ("started",) not in later_listener.events and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)

    first_listener = Recorder(at=2, action=submit_later)
    first = job("red", 1, steps=8, listener=first_listener)
    same = job("green", 3, steps=8)
    futures = [eng.submit(first), eng.submit(same)]
    eng.start()
    try:
        outcomes = results(futures)
        late_outcome = late[0].result(timeout=30)
    finally:
        eng.stop()
    assert [o.batch_size for o in outcomes] == [2, 2]  # the two equal jobs: one batch
    assert late_outcome.batch_size == 1  # steps differ: it waited for the batch to end
    assert [pixels(i) for i in late_outcome.images] == alone(registry, later)


def test_two_workers_step_at_once_on_their_own_pipelines(registry):
    seen = set()

    def hook(jobs, step):
        seen.add(id(registry.get("demo").pipeline(eng._runner.worker())))
        time.sleep(0.02)

    eng = Engine(registry, LocalRunner(workers=2), max_batch_size=1, step_hook=hook)
    jobs = [job("red", 1, steps=6), job("blue", 2, steps=6)]
    futures = [eng.submit(j) for j in jobs]
    eng.start()
    try:
        outcomes = results(futures)
    finally:
        eng.stop()
    assert len(seen) == 2  # each worker used its own pipeline
    for j, outcome in zip(jobs, outcomes, strict=True):
        assert [pixels(image) for image in outcome.images] == alone(registry, j)
    model = registry.get("demo")
    assert model.pipeline(1) is not model.pipeline(0) is model.base
    assert model.pipeline(1) is model.pipeline(1)  # made once per worker


def test_worker_pipelines_share_weights_and_requests_get_their_own_scheduler(tmp_path):
    from blocks.stable_diffusion.tiny_model import write_tiny_sd

    checkpoint = write_tiny_sd(tmp_path / "sd")
    models = parse_models({"models": {"sd": {"family": "sd", "path": str(checkpoint),
                                             "defaults": {"size": "32x32"},
                                             "sizes": ["32x32"]}}}, tmp_path)
    registry = ModelRegistry(models)
    model = registry.load("sd")
    first, second = model.pipeline(0), model.pipeline(1)
    assert second.unet is first.unet and second.vae is first.vae  # one copy of the weights
    assert second.tokenizer is not first.tokenizer  # not shared between threads
    one, other = model.new_scheduler(), model.new_scheduler()
    assert one is not other is not first.scheduler and one.config == first.scheduler.config
    assert type(model.new_scheduler("euler")).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="not one of"):
        model.new_scheduler("nope")


def test_workers_must_be_at_least_one():
    with pytest.raises(ValueError, match="workers must be at least 1"):
        LocalRunner(workers=0)


# -- back-pressure, cancellation, timeouts, failures -------------------------------------------


def test_a_full_queue_raises_queue_full_and_a_cancelled_job_frees_its_slot(registry):
    observer = Observer()
    eng = engine(registry, observer, queue_size=2)
    first, second = job("red"), job("blue")
    first_future = eng.submit(first)
    eng.submit(second)
    with pytest.raises(QueueFull) as full:
        eng.submit(job("green"))
    assert full.value.retry_after >= 1
    assert eng.position(second) == 1
    assert eng.cancel(first) and eng.queued == 1 and eng.position(second) == 0
    with pytest.raises(GenerationCancelled):
        first_future.result(timeout=1)
    assert observer.stopped == [("cancelled", "queued")]
    eng.submit(job("green"))  # the slot is free
    eng.stop()
    with pytest.raises(EngineStopped):
        eng.submit(job("late"))


def test_stop_fails_queued_jobs(registry):
    eng = engine(registry)
    future = eng.submit(job("red"))
    eng.stop()
    with pytest.raises(EngineStopped):
        future.result(timeout=1)


def test_cancelling_one_job_mid_loop_leaves_the_others_unchanged(registry):
    observer = Observer()
    eng = engine(registry, observer)
    quitter = job("red", 1, steps=8)
    quitter.listener = Recorder(at=3, action=lambda: eng.cancel(quitter))
    stayer = job("blue", 2, steps=8, listener=Recorder())
    futures = [eng.submit(quitter), eng.submit(stayer)]
    eng.start()
    try:
        with pytest.raises(GenerationCancelled):
            futures[0].result(timeout=30)
        kept = futures[1].result(timeout=30)
    finally:
        eng.stop()
    assert quitter.listener.steps[-1] in (3, 4)  # stopped at its next step
    assert stayer.listener.steps == list(range(1, 9))
    assert kept.batch_size == 2
    assert [pixels(image) for image in kept.images] == alone(registry, stayer)
    assert observer.stopped == [("cancelled", "running")]


def test_a_job_past_its_deadline_times_out_queued_or_running(registry):
    observer = Observer()
    eng = engine(registry, observer, max_batch_size=1,
                 step_hook=lambda jobs, step: time.sleep(0.02))
    running = job("red", steps=100, timeout_seconds=0.3)
    queued = job("blue", steps=2, timeout_seconds=0.1)  # behind `running`: its pool is full
    futures = [eng.submit(running), eng.submit(queued)]
    eng.start()
    try:
        with pytest.raises(GenerationTimedOut):
            futures[1].result(timeout=30)
        with pytest.raises(GenerationTimedOut) as stopped:
            futures[0].result(timeout=30)
    finally:
        eng.stop()
    assert 0 < stopped.value.step < 100
    assert sorted(observer.stopped) == [(TIMEOUT, "queued"), (TIMEOUT, "running")]


def test_a_failing_job_fails_alone(registry):
    eng = engine(registry, step_hook=fault_injection_hook)
    jobs = [job("red", 1), job("green [[fail]]", 2), job("blue", 3)]
    futures = [eng.submit(j) for j in jobs]
    eng.start()
    try:
        with pytest.raises(InjectedFault):
            futures[1].result(timeout=30)
        good = [futures[0].result(timeout=30), futures[2].result(timeout=30)]
    finally:
        eng.stop()
    for j, outcome in zip((jobs[0], jobs[2]), good, strict=True):
        assert outcome.batch_size == 3
        assert [pixels(image) for image in outcome.images] == alone(registry, j)


def test_bad_input_fails_its_job_only(registry):
    eng = engine(registry)
    bad = job("red", 1, steps=3, scheduler="nope")  # the routes would have caught it
    futures = [eng.submit(bad), eng.submit(job("blue", 2))]
    eng.start()
    try:
        with pytest.raises(ValueError, match="scheduler 'nope'"):
            futures[0].result(timeout=30)
        futures[1].result(timeout=30)
    finally:
        eng.stop()


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


def test_previews_come_with_the_steps_that_ask_for_them(registry):
    listener = Recorder()
    previewed = job("red", 1, steps=4, listener=listener,
                    wants_preview=lambda step, total: step % 2 == 0)
    eng = engine(registry)
    eng.start()
    try:
        eng.submit(previewed).result(timeout=30)
    finally:
        eng.stop()
    shown = [(e[1], e[3] is not None) for e in listener.events if e[0] == "progress"]
    assert shown == [(1, False), (2, True), (3, False), (4, True)]
    preview = next(e[3] for e in listener.events if e[0] == "progress" and e[3])[0]
    assert preview.size == (32, 32)  # the demo denoises pixels


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
