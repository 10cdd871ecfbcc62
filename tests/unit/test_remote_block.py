"""`RemoteBlock` and `BlockHost` without Ray: a fake handle that pickles each call and result
(the wire) and runs it on in-process hosts, one per heavy role, each loading only its role's
components and running the block the call carries. Same pixels as the plain pipeline; the
denoise block streams its steps from a step scheduler, several requests share its forwards
and each gets its own image; a cancelled stream stops the request."""

from __future__ import annotations

import pickle
import queue
import threading

import numpy as np
import pytest
import torch

from blocks import InvalidInput, ModularPipeline
from blocks.batch_invariance import batch_invariant
from blocks.families import DENOISER, HEAVY_ROLES, TEXT_ENCODER, VAE, get_family
from blocks.lora import adapters_for_call, write_lora_file
from blocks.lora.tiny_lora import random_lora
from blocks.stable_diffusion.tiny_model import write_tiny_sd
from deployments.block_host import BlockHost
from deployments.remote_block import (
    ROLE_DEPLOYMENTS,
    BlockCall,
    BlockResult,
    RemoteBlock,
    ReplicaUnavailable,
    remote_pipeline_blocks,
)
from deployments.step_scheduler import StepReport, StepScheduler, TaskOptions, TaskStopped

MODEL = "tiny-sd"


def _wire(value):
    return pickle.loads(pickle.dumps(value))


class _Response:
    def __init__(self, fn, call):
        self._fn, self._call = fn, call
        self.cancelled = False

    def result(self, timeout_s=None):
        return _wire(self._fn(_wire(self._call)))

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, call):
        return _Response(self._fn, call)


class _StreamResponse:
    """A streamed call on the host's step scheduler: what `Denoiser.stream` does, in-process."""

    def __init__(self, host: BlockHost, scheduler: StepScheduler, call, options):
        self.items: queue.Queue = queue.Queue()
        self.closed = False
        response = self

        class Listener:
            def step(self, report):
                response.items.put(_wire(report))

            def finished(self, state):
                response.items.put(_wire(received.result(state)))

            def failed(self, error):
                response.items.put(error)

            def stopped(self):
                return response.closed

        task, received = host.task(_wire(call), _wire(options), Listener())
        scheduler.submit(task)

    def cancel(self):
        self.closed = True
        self.items.put(RuntimeError("cancelled"))

    def __iter__(self):
        while True:
            item = self.items.get(timeout=60)
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, BlockResult):
                return


class _Streaming:
    def __init__(self, host: BlockHost, scheduler: StepScheduler):
        self.host, self.scheduler = host, scheduler
        self.responses: list[_StreamResponse] = []

    def remote(self, call, options):
        response = _StreamResponse(self.host, self.scheduler, call, options)
        self.responses.append(response)
        return response


class FakeHandle:
    """What RemoteBlock uses of a DeploymentHandle: `handle.run.remote(call).result()`, and
    `handle.options(stream=True).stream.remote(call, options)` iterated."""

    def __init__(self, host: BlockHost, scheduler: StepScheduler | None = None):
        self.host = host
        self.run = _Method(host.run)
        self.deployment_name = host.role
        self.stream = _Streaming(host, scheduler) if scheduler is not None else None

    def options(self, stream=False):
        return self


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(write_tiny_sd(tmp_path_factory.mktemp("sd") / "ckpt"))
    models = {MODEL: {"path": path, "family": "sd", "dtype": "float32", "device": "cpu"}}
    hosts = {role: BlockHost(role, models) for role in HEAVY_ROLES}
    local = ModularPipeline.from_pretrained(path)
    local.load_components(dtype=torch.float32)
    local.set_progress_bar_config(disable=True)
    handles = {ROLE_DEPLOYMENTS[role]: FakeHandle(host) for role, host in hosts.items()}
    remote = remote_pipeline_blocks(local.blocks, MODEL, handles,
                                    get_family("sd").heavy_blocks).init_pipeline(path)
    remote.set_progress_bar_config(disable=True)
    return local, remote, hosts, path


COMMON = dict(prompt="a red fox", num_inference_steps=2, height=32, width=32,
              guidance_scale=5.0, output_type="np", output="images")


def test_hosts_load_only_their_roles_components(setup):
    _, remote, hosts, _ = setup
    heavy = {"unet", "vae", "text_encoder"}
    assert set(hosts[DENOISER].loaded()[MODEL]) & heavy == {"unet"}
    assert set(hosts[VAE].loaded()[MODEL]) & heavy == {"vae"}
    assert set(hosts[TEXT_ENCODER].loaded()[MODEL]) & heavy == {"text_encoder"}
    assert {n for n, c in remote.components.items() if c is not None} <= {"scheduler"}
    assert isinstance(remote.blocks.sub_blocks["denoise"], RemoteBlock)


def test_a_hosts_execution_device_is_its_models_even_while_its_modules_are_offloaded(setup):
    # The weight pool offloads an idle module to the meta device; a block that uses no module
    # (setting the timesteps) must still put its tensors on the model's device.
    path = setup[3]
    host = BlockHost(DENOISER, {MODEL: {"path": path, "family": "sd", "dtype": "float32",
                                        "device": "cpu"}})
    host.pipelines[MODEL].components["unet"].to("meta")
    assert host.pipelines[MODEL]._execution_device == torch.device("meta")
    components = host.components(BlockCall(MODEL, "denoise", []))
    assert components._execution_device == torch.device("cpu")


def test_same_pixels_and_generator_state_as_in_process(setup):
    local, remote, _, _ = setup
    g_local, g_remote = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    expected = np.asarray(local(generator=g_local, **COMMON))
    got = np.asarray(remote(generator=g_remote, **COMMON))
    assert np.abs(got - expected).max() <= 1e-4
    # The remote draws advanced the caller's generator exactly as local draws did.
    assert torch.equal(g_local.get_state(), g_remote.get_state())


def test_edit_runs_the_vae_encoder_remotely_with_same_pixels(setup):
    local, remote, _, _ = setup
    image = np.asarray(local(generator=torch.Generator().manual_seed(1), **COMMON))[0]
    from PIL import Image

    source = Image.fromarray((image * 255).round().astype("uint8"))
    edit = dict(COMMON, image=source, strength=0.6)
    expected = np.asarray(local(generator=[torch.Generator().manual_seed(2)], **edit))
    got = np.asarray(remote(generator=[torch.Generator().manual_seed(2)], **edit))
    assert np.abs(got - expected).max() <= 1e-4


def _encoded(remote: ModularPipeline, seed: int, steps: int):
    """A request's state after text encoding, as the router's engine hands it to denoise."""
    from blocks.block import run_block

    state = remote.input_state(prompt=[f"p{seed}"],
                               generator=[torch.Generator().manual_seed(seed)],
                               num_inference_steps=steps, height=32, width=32,
                               guidance_scale=5.0, output_type="np")
    blocks = remote.blocks
    with torch.inference_mode():
        _, state = run_block(blocks.sub_blocks["text_encoder"], "text_encoder", remote, state)
    return blocks.sub_blocks["denoise"], state


def _stream_all(remote_block, components, state, options, reports):
    for item in remote_block.stream(components, state, options):
        if isinstance(item, StepReport):
            reports.append(item)
        else:
            return item


def test_the_denoise_block_streams_its_steps_and_shares_forwards_bit_exactly(setup):
    _, remote, hosts, _ = setup
    requests = [(3, 2), (4, 5)]  # (seed, steps)

    def run(together: bool) -> tuple[list, list]:
        scheduler = StepScheduler(workers=1, batch_window_s=0.0)
        handle = FakeHandle(hosts[DENOISER], scheduler)
        outcomes: list = [None] * len(requests)
        reports: list[list[StepReport]] = [[] for _ in requests]
        threads = []
        for index, (seed, steps) in enumerate(requests):
            denoise, state = _encoded(remote, seed, steps)
            block = RemoteBlock(denoise.block, "denoise", MODEL, handle)
            options = TaskOptions(pool="tiny", want_latents=True)

            def go(index=index, block=block, state=state, options=options):
                outcomes[index] = _stream_all(block, remote, state, options, reports[index])

            threads.append(threading.Thread(target=go))
        if together:  # both wait before the scheduler starts: they start together
            for thread in threads:
                thread.start()
            while scheduler.waiting < len(threads):
                threading.Event().wait(0.01)
            scheduler.start()
        else:
            scheduler.start()
            for thread in threads:
                thread.start()
                thread.join(60)
        for thread in threads:
            thread.join(60)
        scheduler.stop()
        return outcomes, reports

    alone, _ = run(together=False)
    together, reports = run(together=True)
    for (_, steps), a, b, heard in zip(requests, alone, together, reports, strict=True):
        assert torch.equal(a.get("latents"), b.get("latents"))
        assert [r.step for r in heard] == list(range(1, steps + 1))
        assert all(r.total == steps and r.latents is not None for r in heard)
    assert max(r.together for r in reports[0]) == 2  # they shared steps
    # The forwards of each scheduler step are reported once: 2 shared steps, 3 alone.
    assert sorted(n for heard in reports for r in heard for n in r.forwards) == [1, 1, 1, 2, 2]


def test_cancelling_a_stream_stops_its_request_at_the_next_step(setup):
    _, remote, hosts, _ = setup
    scheduler = StepScheduler(workers=1, batch_window_s=0.0)
    scheduler.start()
    try:
        denoise, state = _encoded(remote, 7, 40)
        block = RemoteBlock(denoise.block, "denoise", MODEL,
                            FakeHandle(hosts[DENOISER], scheduler))
        stream = block.stream(remote, state, TaskOptions(pool="tiny"))
        steps = []
        with pytest.raises(TaskStopped):
            for item in stream:
                steps.append(item.step)
                if item.step == 2:
                    stream.cancel()
        assert steps[-1] < 40
        waited = threading.Event()
        while scheduler.active and not waited.wait(0.01):
            pass
        assert scheduler.active == 0  # the scheduler dropped it
    finally:
        scheduler.stop()


class _ElsewhereMethod:
    """`handle.run` on another thread (as on a replica: none of the caller's context)."""

    def __init__(self, fn):
        self._fn = fn

    def remote(self, call):
        method = _Method(self._fn)
        outcome: list = []
        thread = threading.Thread(target=lambda: outcome.append(method.remote(call).result()))

        class Done:
            def result(self, timeout_s=None):
                thread.start()
                thread.join(60)
                return outcome[0]

        return Done()


def test_replicas_load_their_part_of_a_requests_adapters_and_apply_them(setup, tmp_path):
    _, _, _, path = setup
    local = ModularPipeline.from_pretrained(path)
    local.load_components(dtype=torch.float32)
    local.set_progress_bar_config(disable=True)
    file = write_lora_file(tmp_path / "ink.safetensors", *random_lora(
        {"unet": local.unet, "text_encoder": local.text_encoder}, rank=2, seed=5))
    local.load_lora_weights(str(file), adapter_name="ink")
    entry = {"source": str(file), "weight_name": None, "scale": 1.0}
    models = {MODEL: {"path": path, "family": "sd", "dtype": "float32", "device": "cpu",
                      "loras": {"ink": entry, "other": entry}, "max_loaded_loras": 1}}
    hosts = {role: BlockHost(role, models) for role in HEAVY_ROLES}
    handles = {ROLE_DEPLOYMENTS[role]: FakeHandle(host) for role, host in hosts.items()}
    for handle in handles.values():
        handle.run = _ElsewhereMethod(handle.host.run)
    remote = remote_pipeline_blocks(local.blocks, MODEL, handles,
                                    get_family("sd").heavy_blocks).init_pipeline(path)
    remote.set_progress_bar_config(disable=True)

    def image(pipe, adapters):
        with adapters_for_call(adapters):
            return np.asarray(pipe(generator=torch.Generator().manual_seed(3), **COMMON))

    expected = image(local, {"ink": 0.8})
    got = image(remote, {"ink": 0.8})
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(image(remote, {}) - got).max() > 1e-3  # the adapter changed the image
    # Each replica loaded only its own models' part of the file; the VAE none.
    assert hosts[TEXT_ENCODER].pipelines[MODEL].get_list_adapters() == {"text_encoder": ["ink"]}
    assert hosts[DENOISER].pipelines[MODEL].get_list_adapters() == {"unet": ["ink"]}
    assert MODEL not in hosts[VAE].loras

    # A denoise task's adapters (its TaskOptions) load on first use, apply to its rows, and
    # are released when it ends; the LRU keeps max_loaded_loras (1): "other" replaces "ink".
    scheduler = StepScheduler(workers=1, batch_window_s=0.0)
    scheduler.start()
    try:
        denoise, _ = _encoded(remote, 3, 2)
        block = RemoteBlock(denoise.block, "denoise", MODEL,
                            FakeHandle(hosts[DENOISER], scheduler))
        streamed = {}
        for name in ("other", ""):
            options = TaskOptions(pool="tiny", adapters=((name, 0.8),) if name else ())
            streamed[name] = _stream_all(block, remote, _encoded(remote, 3, 2)[1], options, [])
        encoded = _encoded(remote, 3, 2)[1]  # the text encoder without adapters, as above
        with adapters_for_call({"other": 0.8}):
            whole = RemoteBlock(denoise.block, "denoise", MODEL,
                                handles[ROLE_DEPLOYMENTS[DENOISER]])
            _, whole_state = whole(remote, encoded)
    finally:
        scheduler.stop()
    assert torch.equal(streamed["other"].get("latents"), whole_state.get("latents"))
    assert not torch.equal(streamed["other"].get("latents"), streamed[""].get("latents"))
    cache = hosts[DENOISER].loras[MODEL]
    assert cache.loaded == ["other"] and not cache._pins


class _Failing:
    """`handle.run`: raises the next of `errors` per call, then runs `host.run`."""

    def __init__(self, host: BlockHost, errors: list[BaseException]):
        self.host, self.errors, self.calls = host, list(errors), 0

    def remote(self, call):
        self.calls += 1
        if self.errors:
            error = self.errors.pop(0)

            class Raising:
                def result(self, timeout_s=None):
                    raise error

            return Raising()
        return _Response(self.host.run, call)


def _remote_with(setup, errors):
    local, _, hosts, path = setup
    handles = {ROLE_DEPLOYMENTS[role]: FakeHandle(host) for role, host in hosts.items()}
    failing = _Failing(hosts[DENOISER], errors)
    handles[ROLE_DEPLOYMENTS[DENOISER]].run = failing
    pipe = remote_pipeline_blocks(local.blocks, MODEL, handles,
                                  get_family("sd").heavy_blocks).init_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe, failing


def test_a_call_whose_replica_died_is_sent_once_more_with_the_same_result(setup):
    from ray.exceptions import ActorDiedError

    local = setup[0]
    pipe, failing = _remote_with(setup, [ActorDiedError()])
    got = pipe(generator=torch.Generator().manual_seed(7), **COMMON)
    with batch_invariant():  # the kernels a host computes with
        expected = local(generator=torch.Generator().manual_seed(7), **COMMON)
    assert failing.calls == 2
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_replica_failures_become_replica_unavailable_with_retry_after(setup):
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    unreachable = ActorUnavailableError("gone", b"\0" * 16)
    pipe, failing = _remote_with(setup, [ActorDiedError(), unreachable])
    with pytest.raises(ReplicaUnavailable, match="Denoiser unavailable: replica failed twice") \
            as died:
        pipe(generator=torch.Generator().manual_seed(7), **COMMON)
    assert failing.calls == 2 and died.value.retry_after >= 1

    full = BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=2.5)
    pipe, failing = _remote_with(setup, [full])
    with pytest.raises(ReplicaUnavailable, match="queue full") as busy:
        pipe(generator=torch.Generator().manual_seed(7), **COMMON)
    assert failing.calls == 1  # an overloaded deployment is not hammered again
    assert busy.value.retry_after == 3


def test_a_value_refused_in_the_replica_reaches_the_caller_as_its_own_invalid_input(setup):
    from ray.exceptions import RayTaskError

    refused = InvalidInput("denoise.set_timesteps: strength 0.01 with 2 steps leaves no step "
                           "to run", "strength")
    wrapped = RayTaskError("run", "Traceback (most recent call last): ...",
                           refused).as_instanceof_cause()  # what a handle raises
    pipe, failing = _remote_with(setup, [wrapped])
    with pytest.raises(InvalidInput) as error:
        pipe(generator=torch.Generator().manual_seed(7), **COMMON)
    assert error.value is refused and error.value.param == "strength"
    assert failing.calls == 1  # not retried: sending it again would be refused again


def test_the_service_answers_replica_unavailable_with_503_and_retry_after():
    from service.generation import outcome_error

    error = outcome_error(ReplicaUnavailable("Denoiser", "replica failed twice", 5), job=None)
    assert error is not None and error.status == 503
    assert error.headers == {"Retry-After": "5"}
    assert "Denoiser" in error.message
