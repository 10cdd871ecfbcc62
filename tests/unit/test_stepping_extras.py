"""Per-request LoRA adapters and step caches inside shared step forwards (`LoopRun.extras`):
requests with different adapters, scales, caching methods or none share a step's model forward
(split into full and cached sub-forwards where their cache decisions differ), and each image is
bit-identical to the same request stepped alone; the skipped sub-forwards are counted. Tiny SD
and FLUX.2 [klein] checkpoints, batch-invariant CPU kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from blocks.batch_invariance import batch_invariant
from blocks.flux2.tiny_model import write_tiny_flux2_klein
from blocks.lora import adapters_for_call
from blocks.lora.tiny_lora import random_lora
from blocks.stable_diffusion.tiny_model import write_tiny_sd
from blocks.step_cache import StepCache, step_cache_config
from blocks.stepping import ADAPTERS, STEP_CACHE, step_together
from tests.unit.test_stepping import Request, load, together

pytestmark = pytest.mark.usefixtures("quiet_diffusers")

SD = dict(height=32, width=32, guidance_scale=5.0)
FLUX = dict(height=32, width=32, max_sequence_length=32, guidance_scale=4.0)
Extras = Callable[[int], dict[str, Any]]  # a loop's step count -> its extras


def extras(loras: dict[str, float] | None = None, cache: Any = None) -> Extras:
    config = step_cache_config(cache)
    return lambda total: {**({} if loras is None else {ADAPTERS: loras}),
                          **({} if config is None else {STEP_CACHE: StepCache(config, total)})}


class Run(Request):
    """A request whose loop carries `extras` (made fresh when it starts)."""

    def __init__(self, pipe, seed: int, make: Extras, **inputs) -> None:
        super().__init__(pipe, seed, **inputs)
        self.make = make

    def begin(self):
        loop = super().begin()
        loop.extras = self.make(loop.total)
        return loop


def alone(pipe, seed: int, make: Extras, **inputs) -> np.ndarray:
    request = Run(pipe, seed, make, **inputs)
    loop = request.begin()
    with torch.inference_mode(), batch_invariant():
        while not loop.done:
            assert step_together([loop], same_layout=True) == [None]
    return request.end()


def every_module(path: str, module: torch.nn.Module) -> bool:
    return True


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    """Tiny SD with adapters a and b on every Linear and Conv2d of its UNet."""
    pipe = load(write_tiny_sd(tmp_path_factory.mktemp("sd")))
    for seed, name in enumerate("ab"):
        tensors, _ = random_lora({"unet": pipe.unet}, rank=4, alpha=8, seed=seed, layout="kohya",
                                 targets=every_module)
        pipe.load_lora_weights(tensors, adapter_name=name)
    return pipe


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    return load(write_tiny_flux2_klein(tmp_path_factory.mktemp("klein-base"), base=True))


def check_together(pipe, cases, joins, inputs) -> list[int]:
    """Each case (seed, extras, inputs) stepped together (joining at `joins`) equals it alone;
    returns the requests per model call made together."""
    with adapters_for_call({}):  # as the step scheduler's threads: no adapters unless named
        expected = [alone(pipe, seed, make, **inputs, **own) for seed, make, own in cases]
        forwards: list[int] = []
        got = together([Run(pipe, seed, make, **inputs, **own) for seed, make, own in cases],
                       joins=joins, forwards=forwards)
    for seed, (e, g) in zip([c[0] for c in cases], zip(expected, got, strict=True), strict=True):
        assert np.array_equal(e, g), f"request {seed} differs batched"
    return forwards


def test_adapter_sets_and_scales_per_request_share_forwards_bit_exactly(sd_lora):
    cases = [(1, extras({"a": 1.0}), dict(prompt="a fox", num_inference_steps=3)),
             (2, extras({"a": 0.4, "b": 1.3}), dict(prompt="a cat", num_inference_steps=4)),
             (3, extras(), dict(prompt="a tree", num_inference_steps=3)),
             (4, extras({}), dict(prompt="a sea", num_inference_steps=2)),
             (5, extras({"b": 0.7}), dict(prompt="a hat", num_inference_steps=3))]
    forwards = check_together(sd_lora, cases, joins=[0, 0, 0, 1, 1], inputs=SD)
    assert max(forwards) == 5  # all five (two joining mid-loop) in one UNet call
    # The adapters did something: the same request without them is another image.
    with adapters_for_call({}):
        plain, adapted = (alone(sd_lora, 1, extras(loras), prompt="a fox", num_inference_steps=3,
                                **SD) for loras in (None, {"a": 1.0}))
    assert not np.array_equal(plain, adapted)


def test_deepcache_decisions_per_request_split_a_step_into_sub_forwards(sd_lora):
    caches: list[StepCache] = []

    def kept(make: Extras) -> Extras:
        def made(total: int) -> dict[str, Any]:
            values = make(total)
            caches.append(values[STEP_CACHE])
            return values
        return made

    every_2 = {"method": "deepcache", "interval": 2}
    cases = [(1, kept(extras(cache=every_2)), dict(prompt="a fox", num_inference_steps=4)),
             (2, kept(extras({"a": 0.8}, {"method": "deepcache", "interval": 3})),
              dict(prompt="a cat", num_inference_steps=5)),
             (3, extras(), dict(prompt="a tree", num_inference_steps=4)),
             (4, kept(extras(cache=every_2)), dict(prompt="a sea", num_inference_steps=4))]
    forwards = check_together(sd_lora, cases, joins=[0, 1, 0, 2], inputs=SD)
    batched = caches[3:]  # the first three were the alone runs'
    # interval 2 over 4 steps: full, cached, full, cached; interval 3 over 5: f c c f c.
    assert [(c.full, c.cached) for c in batched] == [(2, 2), (2, 3), (2, 2)]
    # One forward per distinct (config, decision), requests without caching apart. Tick by
    # tick, requests 1 3 2 4 (join order; f full, c cached, p plain): fp, cpf, fpcf (1 and 4
    # share one), cpcc (1 and 4 share one), then 2 and 4 (different intervals): ff, cc.
    assert forwards == [1, 1, 1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1]


def test_flux_probe_methods_and_guidance_passes_decide_per_request(flux_base):
    caches: list[StepCache] = []

    def kept(cache: dict) -> Extras:
        def made(total: int) -> dict[str, Any]:
            values = extras(cache=cache)(total)
            caches.append(values[STEP_CACHE])
            return values
        return made

    cases = [(1, kept({"method": "teacache", "threshold": 0.6}),
              dict(prompt="a fox", num_inference_steps=5)),
             (2, kept({"method": "fbcache", "threshold": 0.5}),
              dict(prompt="a cat", num_inference_steps=4)),
             (3, extras(), dict(prompt="a tree", num_inference_steps=3)),
             (4, kept({"method": "teacache", "threshold": 0.6}),
              dict(prompt="a sea", num_inference_steps=4))]
    check_together(flux_base, cases, joins=[0, 0, 1, 1], inputs=FLUX)
    batched = caches[3:]
    assert [len(c.slots) for c in batched] == [2, 2, 2]  # conditional and unconditional passes
    assert [c.full + c.cached for c in batched] == [10, 8, 8]  # every pass decided every step
    assert batched[0].cached > 0 and batched[2].cached > 0  # teacache skipped some


@pytest.mark.parametrize("model, cache", [("sd_lora", {"method": "deepcache", "interval": 2}),
                                           ("flux_base", {"method": "teacache"})])
def test_a_failing_request_with_a_step_cache_fails_alone(model, cache, request):
    """Its sub-forward (a probe forward, for teacache) fails for the group, is retried per
    request under the cache call narrowed to it, and only the bad request fails."""
    pipe = request.getfixturevalue(model)
    inputs = dict(prompt="x", num_inference_steps=3, **(SD if model == "sd_lora" else FLUX))
    with adapters_for_call({}):
        expected = alone(pipe, 1, extras(cache=cache), **inputs)
        good, bad = Run(pipe, 1, extras(cache=cache), **inputs), \
            Run(pipe, 2, extras(cache=cache), **inputs)
        with torch.inference_mode(), batch_invariant():
            good.begin(), bad.begin()
            latents = bad.loop.block_state.latents
            bad.loop.block_state.latents = latents[:, :2] if latents.ndim == 4 \
                else latents[..., :2]  # wrong channels
            errors = step_together([good.loop, bad.loop], same_layout=True)
            assert errors[0] is None and isinstance(errors[1], Exception)
            while not good.loop.done:
                assert step_together([good.loop], same_layout=True) == [None]
        assert np.array_equal(good.end(), expected)
