"""`RemoteBlock` and `BlockHost` without Ray: a fake handle that pickles each call and result
(the wire) and runs it on in-process hosts, one per heavy role, each loading only its role's
components. Same pixels as the plain pipeline; batched denoising gives each request its own
image; a cancelled wait cancels the pending call."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch

from blocks import GenerationCancelled, ModularPipeline
from blocks.batch_invariance import batch_invariant
from blocks.stable_diffusion.tiny_model import write_tiny_sd
from deployments.block_host import BlockHost, batch_key
from deployments.remote_block import (
    RemoteBlock,
    ReplicaUnavailable,
    remote_cancel_check,
    remote_pipeline_blocks,
    wait_cancellable,
)

MODEL = "tiny-sd"


class _Response:
    def __init__(self, fn, call):
        self._fn, self._call = fn, call
        self.cancelled = False

    def result(self, timeout_s=None):
        return pickle.loads(pickle.dumps(self._fn(pickle.loads(pickle.dumps(self._call)))))

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, call):
        return _Response(self._fn, call)


class FakeHandle:
    """What RemoteBlock uses of a DeploymentHandle: `handle.run.remote(call).result()`."""

    def __init__(self, host: BlockHost):
        self.host = host
        self.run = _Method(host.run)
        self.deployment_name = host.role


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(write_tiny_sd(tmp_path_factory.mktemp("sd") / "ckpt"))
    models = {MODEL: {"path": path, "dtype": "float32", "device": "cpu"}}
    hosts = {role: BlockHost(role, models) for role in ("TextEncoder", "Denoiser", "VAE")}
    local = ModularPipeline.from_pretrained(path)
    local.load_components(dtype=torch.float32)
    local.set_progress_bar_config(disable=True)
    handles = {role: FakeHandle(host) for role, host in hosts.items()}
    remote = remote_pipeline_blocks(local.blocks, MODEL, handles).init_pipeline(path)
    remote.set_progress_bar_config(disable=True)
    return local, remote, hosts, path


COMMON = dict(prompt="a red fox", num_inference_steps=2, height=32, width=32,
              guidance_scale=5.0, output_type="np", output="images")


def test_hosts_load_only_their_roles_components(setup):
    _, remote, hosts, _ = setup
    heavy = {"unet", "vae", "text_encoder"}
    assert set(hosts["Denoiser"].loaded()[MODEL]) & heavy == {"unet"}
    assert set(hosts["VAE"].loaded()[MODEL]) & heavy == {"vae"}
    assert set(hosts["TextEncoder"].loaded()[MODEL]) & heavy == {"text_encoder"}
    assert {n for n, c in remote.components.items() if c is not None} <= {"scheduler"}
    assert isinstance(remote.blocks.sub_blocks["denoise"], RemoteBlock)


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


def test_merged_denoise_calls_give_each_request_its_own_latents(setup):
    _, remote, hosts, path = setup
    calls = []
    denoiser = hosts["Denoiser"]
    recorder = FakeHandle(denoiser)
    recorder.run = _Method(lambda call: calls.append(call) or denoiser.run(call))
    blocks = remote.blocks
    blocks.sub_blocks["denoise"] = RemoteBlock(blocks.sub_blocks["denoise"].block, "denoise",
                                               MODEL, recorder)
    pipe = blocks.init_pipeline(path)
    pipe.update_components(scheduler=remote.scheduler)
    pipe.set_progress_bar_config(disable=True)
    for seed in (3, 4, 5):
        pipe(prompt=f"p{seed}", generator=[torch.Generator().manual_seed(seed)],
             num_inference_steps=2, height=32, width=32, guidance_scale=5.0, output="latents")
    assert len({batch_key(call, i) for i, call in enumerate(calls)}) == 1  # all compatible
    alone = [denoiser.run(call) for call in calls]
    merged = denoiser.run_many(calls)
    for one, many in zip(alone, merged, strict=True):
        a, b = dict((k, v) for k, v, _ in one.outputs), dict((k, v) for k, v, _ in many.outputs)
        assert b["latents"].shape == a["latents"].shape == (1, 4, 8, 8)
        assert torch.allclose(a["latents"], b["latents"], atol=1e-5)
        assert all(torch.equal(x, y) for x, y in
                   zip(one.generator_states, many.generator_states, strict=True))


def test_wait_cancellable_cancels_the_pending_call():
    stop = threading.Event()

    class Pending:
        cancelled = False

        def result(self, timeout_s=None):
            stop.set()  # the caller decides to stop while the call is in flight
            raise TimeoutError

        def cancel(self):
            self.cancelled = True

    pending = Pending()
    token = remote_cancel_check.set(stop.is_set)
    try:
        with pytest.raises(GenerationCancelled):
            wait_cancellable(pending)
    finally:
        remote_cancel_check.reset(token)
    assert pending.cancelled


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
    handles = {role: FakeHandle(host) for role, host in hosts.items()}
    failing = _Failing(hosts["Denoiser"], errors)
    handles["Denoiser"].run = failing
    pipe = remote_pipeline_blocks(local.blocks, MODEL, handles).init_pipeline(path)
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


def test_the_service_answers_replica_unavailable_with_503_and_retry_after():
    from service.generation import outcome_error

    error = outcome_error(ReplicaUnavailable("Denoiser", "replica failed twice", 5), job=None)
    assert error is not None and error.status == 503
    assert error.headers == {"Retry-After": "5"}
    assert "Denoiser" in error.message
