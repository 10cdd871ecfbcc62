"""The engine: one code path that runs generation jobs in embedded and in Ray mode.

Routes only `submit`, `cancel` and await the future. A job goes through

1. the **queue**: bounded, first come first served. `submit` never blocks: a full queue raises
   `QueueFull` (429 with Retry-After, estimated from recent job times), a stopped engine
   `EngineStopped` (503). Each job knows its position (`position`).
2. **admission**: a job leaves the queue as soon as its pool (its model at its size) has room:
   fewer than the runner's capacity in images running (the model's `max_batch_size` per
   forward, times the workers). No batching window: a lone job starts at once. Its listener
   hears `started`.
3. the **stages**, on the placement's runner (`service.placement`): the top-level blocks before
   the denoise block (text encoding...) for every job admitted together, merged into one call
   where their inputs allow (`service.merged_calls`); then the denoise block, on the step
   scheduler wherever the denoiser runs (in-process, or a `Denoiser` replica that streams the
   steps back), where the job's steps share model forwards with every other running job of its
   pool, joining and leaving between steps; then the blocks after it (decoding...) for every
   job whose loop finished at the same time, merged too.

Per step the job's listener hears `progress` (with latent previews when asked). Every job
keeps its own scheduler object, generators and state, and the models compute under
batch-invariant CPU kernels, so a job's images are the same bytes alone or sharing steps.

- Stopping: `cancel(job)` drops a queued job at once (its slot is free immediately) and stops a
  running one at its next denoising step without touching the jobs it shares steps with; a job
  past its deadline (`timeout_seconds` after submission, queue time included) is stopped the
  same way. A job stopped after its last step (while decoding) keeps its images.
- Failures: a stage that fails for a merged call is retried per job, a failing step fails its
  job only; either way no job fails because of another.
- LoRA adapters and step caching are per job: its adapters are loaded and pinned from its
  start to its end; its text encoding and decoding merge only with jobs of the same adapter
  set (run under those adapters); its denoising steps share forwards with any job of its pool,
  its adapters applied to its rows only and its step cache deciding for it alone (split into
  full and cached sub-forwards: `deployments.step_scheduler`, `blocks.stepping`).
- `scheduling="request"` (per model in the models file, or `BLOCKSERVE_SCHEDULING`) keeps
  request-level batching for comparison: jobs with equal `batch_key`s run as one batch from
  first step to last, and nobody joins it mid-loop (see `deployments.step_scheduler`).

Not handled here: validation, HTTP, priorities, and where blocks run (the placement).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from blocks import ModularPipelineBlocks, PipelineState
from blocks.batch_invariance import batch_invariant
from blocks.composites import CompositeBlocks
from blocks.errors import Unavailable
from blocks.lora import adapters_for_call
from blocks.stepping import ComponentsView
from deployments.step_scheduler import POLICIES, Policy, StepReport, TaskOptions, TaskStopped
from service.jobs import CANCELLED, GenerationJob, GenerationResult
from service.merged_calls import Member, run_merged
from service.placement import DenoiseRequest, Runner
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)

QUEUED, RUNNING = "queued", "running"  # where a job was when it stopped (a metric label)

# (the jobs, the 0-based step just finished); may raise to fail those jobs (test hooks).
StepHook = Callable[[Sequence[GenerationJob], int], None]


class EngineBusy(Unavailable):
    """No job can be queued now; retry in about `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message, retry_after)


class QueueFull(EngineBusy):
    """The queue holds as many jobs as it may (HTTP 429)."""


class EngineStopped(EngineBusy):
    """The engine is shutting down (HTTP 503)."""


class EngineObserver(Protocol):
    """What the engine reports (the app's metrics implement it)."""

    def job_started(self, model: str, queue_seconds: float) -> None: ...

    def job_stopped(self, model: str, reason: str, stage: str) -> None:
        """A job was cancelled or timed out (`reason`) while `stage` (queued or running)."""

    def denoise_step(self, model: str, report: StepReport) -> None:
        """A job finished a denoising step (`report.forwards`, `.images` and `.seconds` are
        set for one job per step of the scheduler; `.cache_*` on each report of a job that
        caches, its own decisions: see `StepReport`)."""

    def block_finished(self, model: str, block: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class Stages:
    """A model's top-level blocks: those before the denoise block, the block that holds the
    denoise loop (None: the model has none) and those after it."""

    before: tuple[tuple[str, ModularPipelineBlocks], ...]
    denoise: tuple[str, ModularPipelineBlocks] | None
    after: tuple[tuple[str, ModularPipelineBlocks], ...]

    @classmethod
    def of(cls, blocks: ModularPipelineBlocks) -> Stages:
        if not isinstance(blocks, CompositeBlocks) or blocks.is_loop:
            return cls((), ("", blocks), ()) if _holds_loop(blocks) else cls((("", blocks),),
                                                                               None, ())
        children = list(blocks.sub_blocks.items())
        for index, (_, child) in enumerate(children):
            if _holds_loop(child):
                return cls(tuple(children[:index]), children[index],
                           tuple(children[index + 1:]))
        return cls(tuple(children), None, ())


def _holds_loop(block: Any) -> bool:
    inner = getattr(block, "block", None)  # a RemoteBlock stands in for the block it runs
    if isinstance(inner, ModularPipelineBlocks):
        return _holds_loop(inner)
    if block.is_loop:
        return True
    return isinstance(block, CompositeBlocks) and any(
        _holds_loop(child) for child in block.sub_blocks.values())


@dataclass(eq=False)
class _Entry:
    job: GenerationJob
    future: Future[GenerationResult] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    pool: Hashable = None
    model: LoadedModel | None = None
    member: Member | None = None
    admitted: float = 0.0
    step: int = 0  # denoising steps done
    shared: int = 1  # the most requests it shared a step with
    stop_now: Callable[[], None] | None = None  # stops its denoise block at once (Ray)
    denoise_started: float = 0.0
    done: bool = False
    pinned: bool = False  # its LoRA adapters are pinned in its model (released when done)


def _resolve(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by its caller meanwhile: nobody is waiting
        pass


class Engine:
    """Queue, admission and stages of generation jobs (see the module docstring)."""

    def __init__(
        self,
        registry: ModelRegistry,
        runner: Runner,
        queue_size: int = 64,
        max_batch_size: int = Settings.model_fields["max_batch_size"].default,
        scheduling: Policy = "step",
        observer: EngineObserver | None = None,
        step_hook: StepHook | None = None,
    ) -> None:
        if scheduling not in POLICIES:
            raise ValueError(f"scheduling must be one of {', '.join(POLICIES)}, "
                             f"got {scheduling!r}")
        self._registry = registry
        self._runner = runner
        self.queue_size = queue_size
        self.max_batch_size = max_batch_size
        self.scheduling = scheduling
        self._observer = observer
        self._step_hook = step_hook
        self._cond = threading.Condition()
        self._pending: list[_Entry] = []  # arrival order
        self._running: list[_Entry] = []
        self._finishing: list[tuple[_Entry, PipelineState]] = []  # loops done, to decode
        self._finish_scheduled = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._job_seconds = 1.0  # moving average of admission to result, for Retry-After

    # -- the interface the routes use ------------------------------------------------------

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    def start(self) -> None:
        with self._cond:
            self._stopping = False
            if self._thread is None or not self._thread.is_alive():
                self._runner.start()
                self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                                name="blockserve-engine")
                self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail queued jobs with `EngineStopped`, stop the runner (which fails the running
        ones), stop admitting."""
        with self._cond:
            self._stopping = True
            dropped, self._pending = self._pending, []
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        for entry in dropped:
            _resolve(entry.future, error=EngineStopped("the server is shutting down"))
        if thread is not None:
            thread.join(timeout)
        self._runner.stop()
        with self._cond:
            running, self._running = self._running, []
        for entry in running:
            _resolve(entry.future, error=EngineStopped("the server is shutting down"))

    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        """Queue `job`; the future resolves to its result or the error it ended with
        (`GenerationCancelled`, `GenerationTimedOut`, or what its blocks raised).
        Raises `EngineBusy` (`QueueFull`, `EngineStopped`) when it can't be queued."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"{len(self._pending)} jobs are already waiting",
                                self._retry_after())
            entry = _Entry(job)
            self._pending.append(entry)
            if job.listener is not None:  # under the lock: `queued` always comes first
                job.listener.queued(len(self._pending) - 1)
            self._cond.notify_all()
        return entry.future

    def cancel(self, job: GenerationJob, reason: str = CANCELLED) -> bool:
        """Stop `job`: dropped now if queued, at its next step if running. True if this call
        stopped it (False: it had already stopped or finished)."""
        stopped = job.cancel(reason)
        with self._cond:
            queued = next((e for e in self._pending if e.job is job), None)
            if queued is not None:
                self._pending.remove(queued)
                self._cond.notify_all()
            running = next((e for e in self._running if e.job is job), None)
        if queued is not None:
            self._stopped(queued, job.stop_error(), QUEUED)
        if running is not None and running.stop_now is not None:
            running.stop_now()
        return stopped

    def position(self, job: GenerationJob) -> int | None:
        """How many jobs are ahead of `job` in the queue; None when it is not queued."""
        with self._cond:
            for index, entry in enumerate(self._pending):
                if entry.job is job:
                    return index
        return None

    # -- admission -------------------------------------------------------------------------

    def _retry_after(self) -> int:
        ahead = len(self._pending) / max(1, self._runner.capacity(self.max_batch_size)) + 1
        return max(1, min(60, math.ceil(self._job_seconds * ahead)))

    def _cap(self, model: str) -> int:
        try:
            configured = self._registry.config(model).max_batch_size
        except KeyError:
            configured = None
        return configured or self.max_batch_size

    def _policy(self, model: str) -> Policy:
        try:
            configured = self._registry.config(model).scheduling
        except KeyError:
            configured = None
        return configured or self.scheduling

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                expired = self._take_expired()
                admitted = self._admit()
                if not admitted and not expired:
                    # Deadlines of running jobs are checked at least this often.
                    self._cond.wait(0.05)
                running = list(self._running)
            for entry in expired:
                self._stopped(entry, entry.job.stop_error(), QUEUED)
            for entry in running:  # a running job past its deadline stops now, not later
                if entry.job.check_deadline() and entry.stop_now is not None:
                    entry.stop_now()
            if admitted:
                self._start(admitted)

    def _take_expired(self) -> list[_Entry]:
        """Queued jobs stopped without the engine's knowledge, or past their deadline."""
        now = time.monotonic()
        expired = [e for e in self._pending if e.job.check_deadline(now)]
        for entry in expired:
            self._pending.remove(entry)
        return expired

    def _admit(self) -> list[_Entry]:
        """Queued jobs whose pool has room, oldest first (under the lock)."""
        images: dict[Hashable, int] = {}
        for entry in self._running:
            images[entry.pool] = images.get(entry.pool, 0) + entry.job.n
        admitted, full = [], set()
        for entry in self._pending:
            job = entry.job
            pool = (job.model, job.width, job.height)
            if pool in full:
                continue
            used = images.get(pool, 0)
            if used and used + job.n > self._runner.capacity(self._cap(job.model)):
                full.add(pool)  # first come, first served within a pool
                continue
            entry.pool = pool
            images[pool] = used + job.n
            admitted.append(entry)
        for entry in admitted:
            self._pending.remove(entry)
            self._running.append(entry)
        return admitted

    def _start(self, entries: list[_Entry]) -> None:
        now = time.monotonic()
        by_model: dict[str, list[_Entry]] = {}
        for entry in entries:
            entry.admitted = now
            job = entry.job
            if self._observer is not None:
                self._observer.job_started(job.model, now - entry.enqueued)
            if job.listener is not None:
                job.listener.started()
            by_model.setdefault(job.model, []).append(entry)
        for model, group in by_model.items():
            try:
                loaded = self._registry.get(model)
            except Exception as error:  # e.g. not ready: every job of this model fails alike
                for entry in group:
                    self._fail(entry, error)
                continue
            for entry in group:
                entry.model = loaded
            self._runner.run(lambda group=group: self._run_stage(group, before=True))

    # -- stages ----------------------------------------------------------------------------

    def _run_stage(self, entries: list[_Entry], before: bool) -> None:
        """The top-level blocks before (or after) the denoise block, for `entries` (one
        model), merged; then each job's denoise block (or its result)."""
        try:
            live = [e for e in entries if not (before and self._stopped_before_start(e))]
            if not live:
                return
            model = live[0].model
            assert model is not None
            stages = Stages.of(model.blocks)
            if before:
                pipe = model.pipeline(self._runner.worker())
                for entry in list(live):
                    try:
                        entry.member = self._member(model, pipe, entry.job)
                        self._pin_adapters(entry)
                    except Exception as error:  # this job's inputs or adapters
                        live.remove(entry)
                        self._fail(entry, error)
            blocks = stages.before if before else stages.after
            by_adapters: dict[tuple[tuple[str, float], ...], list[_Entry]] = {}
            for entry in live:
                by_adapters.setdefault(_adapter_set(entry.job), []).append(entry)
            live = []
            for adapters, group in by_adapters.items():
                # Text encoders may carry adapters too: a merged call serves one set.
                with adapters_for_call(dict(adapters)):
                    for name, block in blocks:
                        group = self._run_merged(model, name, block, group)
                live.extend(group)
            for entry in live:
                if not before or stages.denoise is None:
                    self._succeed(entry)
                else:
                    self._denoise(entry, *stages.denoise)
        except Exception as error:  # a bug here must not leave jobs hanging
            logger.exception("engine: a stage failed unexpectedly")
            for entry in entries:
                self._fail(entry, error)

    @staticmethod
    def _member(model: LoadedModel, pipe: Any, job: GenerationJob) -> Member:
        """The job's state and components: the worker's pipeline with the job's own scheduler
        in front (schedulers keep per-request state)."""
        scheduler = model.new_scheduler(job.scheduler)
        components = ComponentsView(pipe, {} if scheduler is None else {"scheduler": scheduler})
        return Member(components, pipe.input_state(**job.pipeline_inputs(model.accepts)), job.n)

    def _stopped_before_start(self, entry: _Entry) -> bool:
        if entry.job.check_deadline():
            self._stopped(entry, entry.job.stop_error(), RUNNING)
            return True
        return False

    def _run_merged(self, model: LoadedModel, name: str, block: ModularPipelineBlocks,
                    entries: list[_Entry]) -> list[_Entry]:
        members = [entry.member for entry in entries]
        observe = None
        if self._observer is not None:
            observer = self._observer
            observe = lambda seconds: observer.block_finished(model.name, name, seconds)  # noqa: E731
        with torch.inference_mode(), batch_invariant(model.device):
            errors = run_merged(block, name, members, observe)  # type: ignore[arg-type]
        live = []
        for entry, error in zip(entries, errors, strict=True):
            if error is None:
                live.append(entry)
            else:
                self._fail(entry, error)
        return live

    def _denoise(self, entry: _Entry, name: str, block: ModularPipelineBlocks) -> None:
        model, job, member = entry.model, entry.job, entry.member
        assert model is not None and member is not None
        entry.denoise_started = time.monotonic()
        options = TaskOptions(
            pool=entry.pool, images=job.n, cap=self._cap(job.model),
            policy=self._policy(job.model), lockstep=job.batch_key,
            want_latents=job.wants_preview is not None, adapters=_adapter_set(job),
            step_cache=job.step_cache)
        request = DenoiseRequest(
            model=model.name, block=block, name=name, components=member.components,
            state=member.state, listener=_Progress(self, entry), options=options,
            device=model.device)
        try:
            entry.stop_now = self._runner.denoise(request)
        except Exception as error:
            self._fail(entry, error)

    def _pin_adapters(self, entry: _Entry) -> None:
        """Load the job's LoRA adapters (on first use) and pin them until it is done."""
        names = [name for name, _ in entry.job.loras]
        if names:
            assert entry.model is not None
            entry.model.pin_loras(names)
            entry.pinned = True

    def _denoised(self, entry: _Entry, state: PipelineState) -> None:
        """A job's denoise block is done: decode it with whoever finished with it."""
        model = entry.model
        assert model is not None and entry.member is not None
        denoise = Stages.of(model.blocks).denoise
        if self._observer is not None and denoise is not None:
            self._observer.block_finished(model.name, denoise[0],
                                          time.monotonic() - entry.denoise_started)
        entry.member.state = state
        with self._cond:
            self._finishing.append((entry, state))
            if self._finish_scheduled:
                return
            self._finish_scheduled = True
        try:
            self._runner.run(self._finish)
        except RuntimeError:  # the runner stopped: so did the engine
            with self._cond:
                finishing, self._finishing = self._finishing, []
                self._finish_scheduled = False
            for waiting, _ in finishing:
                self._fail(waiting, EngineStopped("the server is shutting down"))

    def _finish(self) -> None:
        with self._cond:
            finishing, self._finishing = self._finishing, []
            self._finish_scheduled = False
        by_model: dict[str, list[_Entry]] = {}
        for entry, _ in finishing:
            by_model.setdefault(entry.job.model, []).append(entry)
        for group in by_model.values():
            self._run_stage(group, before=False)

    # -- outcomes --------------------------------------------------------------------------

    def _release(self, entry: _Entry) -> bool:
        """Take `entry` out of the running jobs (its adapters unpinned); False if it was
        already done."""
        with self._cond:
            if entry.done:
                return False
            entry.done = True
            if entry in self._running:
                self._running.remove(entry)
            self._cond.notify_all()
            if entry.admitted:
                self._job_seconds = (0.8 * self._job_seconds
                                     + 0.2 * (time.monotonic() - entry.admitted))
        if entry.pinned and entry.model is not None:
            entry.pinned = False
            entry.model.unpin_loras([name for name, _ in entry.job.loras])
        return True

    def _succeed(self, entry: _Entry) -> None:
        if not self._release(entry):
            return
        job, member = entry.job, entry.member
        assert member is not None
        images = list(member.state.get("images") or [])
        if len(images) != job.n:
            _resolve(entry.future, error=RuntimeError(
                f"model {job.model!r} returned {len(images)} images for a job of {job.n}"))
            return
        _resolve(entry.future, result=GenerationResult(
            images, job.seeds, time.monotonic() - entry.admitted, entry.shared))

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        if isinstance(error, TaskStopped) or entry.job.cancelled.is_set():
            self._stopped(entry, entry.job.stop_error(entry.step), RUNNING)
            return
        if self._stopping:  # the runner failed it because the engine is stopping
            error = EngineStopped("the server is shutting down")
        if self._release(entry):
            _resolve(entry.future, error=error)

    def _stopped(self, entry: _Entry, error: Exception, stage: str) -> None:
        if stage == RUNNING and not self._release(entry):
            return
        if self._observer is not None:
            self._observer.job_stopped(entry.job.model, entry.job.stop_reason or CANCELLED,
                                       stage)
        _resolve(entry.future, error=error)


def _adapter_set(job: GenerationJob) -> tuple[tuple[str, float], ...]:
    """The job's LoRA adapters (name, scale), in one order whatever order the request gave."""
    return tuple(sorted(job.loras))


def run_job(registry: ModelRegistry, job: GenerationJob) -> GenerationResult:
    """Run one job through an engine of its own in this process (the CLI's `generate`): the
    same code, kernels and bytes as the server. Raises the job's error."""
    from service.placement import LocalRunner

    engine = Engine(registry, LocalRunner(), queue_size=1)
    engine.start()
    try:
        return engine.submit(job).result()
    finally:
        engine.stop()


class _Progress:
    """A running job's denoise listener: steps become progress events and metrics."""

    def __init__(self, engine: Engine, entry: _Entry) -> None:
        self.engine, self.entry = engine, entry

    def step(self, report: StepReport) -> None:
        engine, entry = self.engine, self.entry
        job = entry.job
        entry.step = report.step
        entry.shared = max(entry.shared, report.together)
        if engine._observer is not None:
            engine._observer.denoise_step(job.model, report)
        if engine._step_hook is not None:
            engine._step_hook([job], report.step - 1)
        if job.listener is None:
            return
        previews = None
        if (report.latents is not None and job.wants_preview is not None
                and job.wants_preview(report.step, report.total)):
            assert entry.model is not None
            preview_map = engine._runner.preview_map(entry.model)
            if preview_map is not None:
                previews = preview_map.images(report.latents)
        job.listener.progress(report.step, report.total, previews)

    def finished(self, state: PipelineState) -> None:
        self.engine._denoised(self.entry, state)

    def failed(self, error: BaseException) -> None:
        self.engine._fail(self.entry, error)

    def stopped(self) -> bool:
        return self.entry.job.check_deadline()
