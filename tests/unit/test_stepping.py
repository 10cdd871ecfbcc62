"""Steppable denoise loops (`blocks.stepping`): started per request, stepped from outside, one
step's model forward shared by several requests — and every image bit-identical to the same
request stepped alone, whatever shared its steps and wherever it joined (batch-invariant CPU
kernels). Stable Diffusion (text-to-image, image-to-image, 4-channel inpainting, ControlNet),
FLUX.2 [klein] (distilled, and base with guidance) and the demo, on tiny checkpoints.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from blocks import ModularPipeline
from blocks.batch_invariance import batch_invariant
from blocks.flux2.tiny_model import write_tiny_flux2_klein
from blocks.stable_diffusion.tiny_model import write_tiny_sd
from blocks.stepping import BlockRun, ComponentsView, step_together

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def load(path) -> ModularPipeline:
    pipe = ModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"), controlnet=True)


@pytest.fixture(scope="module")
def sd(sd_path) -> ModularPipeline:
    return load(sd_path)


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> ModularPipeline:
    return load(write_tiny_flux2_klein(tmp_path_factory.mktemp("klein")))


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory) -> ModularPipeline:
    return load(write_tiny_flux2_klein(tmp_path_factory.mktemp("klein-base"), base=True))


class Request:
    """One request's pipeline run, paused at its loop: its own state, scheduler, generator."""

    def __init__(self, pipe: ModularPipeline, seed: int, **inputs) -> None:
        self.pipe = pipe
        self.blocks = pipe.blocks
        components = ComponentsView(pipe, {"scheduler": copy.deepcopy(pipe.scheduler)})
        state = pipe.input_state(generator=[torch.Generator().manual_seed(seed)],
                                 output_type="np", **inputs)
        self.run = BlockRun(self.blocks, "", components, state)
        self.loop = None
        self.forwards: list[int] = []

    def begin(self):
        with torch.inference_mode(), batch_invariant():
            self.loop = self.run.advance()
        return self.loop

    def end(self) -> np.ndarray:
        with torch.inference_mode(), batch_invariant():
            assert self.run.advance() is None
        return np.asarray(self.run.state.get("images"))


def alone(pipe: ModularPipeline, seed: int, **inputs) -> np.ndarray:
    request = Request(pipe, seed, **inputs)
    loop = request.begin()
    with torch.inference_mode(), batch_invariant():
        while not loop.done:
            assert step_together([loop], same_layout=True) == [None]
    return request.end()


def together(requests: list[Request], joins: list[int], forwards: list[int]) -> list:
    """Step the requests together; request k joins at tick `joins[k]` (mid-loop of the others).
    Returns each one's images."""
    active: list[Request] = []
    tick = 0
    with torch.inference_mode(), batch_invariant():
        while True:
            for request, join in zip(requests, joins, strict=True):
                if join == tick:
                    request.begin()
                    active.append(request)
            stepping = [r for r in active if not r.loop.done]
            if not stepping and len(active) == len(requests):
                break
            if stepping:
                errors = step_together([r.loop for r in stepping], same_layout=True,
                                       on_forward=lambda n, rows, s: forwards.append(n))
                assert errors == [None] * len(stepping)
            tick += 1
    return [request.end() for request in requests]


def test_stepped_alone_is_the_plain_call_under_the_same_kernels(sd):
    # SD's UNet inputs are contiguous already, so copying them changes nothing here.
    inputs = dict(prompt="a red fox", num_inference_steps=3, height=32, width=32,
                  guidance_scale=5.0)
    with batch_invariant():
        plain = sd(generator=[torch.Generator().manual_seed(4)], output_type="np",
                   output="images", **inputs)
    assert np.array_equal(alone(sd, 4, **inputs), np.asarray(plain))


def test_sd_mixed_steps_guidance_workflows_and_joins_share_forwards_bit_exactly(sd):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    mask = Image.fromarray(np.where(np.arange(32)[:, None] < 16, 255, 0).astype(np.uint8)
                           .repeat(32, 1)).convert("L")
    base = dict(height=32, width=32)
    cases = [
        (1, dict(prompt="a red fox", num_inference_steps=4, guidance_scale=5.0)),
        (2, dict(prompt="a blue cat", num_inference_steps=9, guidance_scale=7.5)),
        (3, dict(prompt="a tree", num_inference_steps=6, guidance_scale=1.0)),  # no guidance
        (4, dict(prompt="an edit", image=image, strength=0.7, num_inference_steps=5,
                 guidance_scale=5.0)),
        (5, dict(prompt="a fill", image=image, mask_image=mask, num_inference_steps=4,
                 guidance_scale=6.0)),
    ]
    expected = [alone(sd, seed, **base, **inputs) for seed, inputs in cases]
    forwards: list[int] = []
    got = together([Request(sd, seed, **base, **inputs) for seed, inputs in cases],
                   joins=[0, 0, 1, 2, 3], forwards=forwards)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(e, g)
    assert max(forwards) == 5  # at some step all five shared one UNet call


def test_controlnet_requests_step_alone_through_the_same_stepping(sd_path):
    from blocks.stable_diffusion import StableDiffusionControlNetAutoBlocks

    pipe = StableDiffusionControlNetAutoBlocks().init_pipeline(str(sd_path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    cases = [(1, dict(prompt="a", control_image=control, num_inference_steps=3)),
             (2, dict(prompt="b", control_image=control, num_inference_steps=2))]
    expected = [alone(pipe, seed, height=32, width=32, guidance_scale=5.0, **inputs)
                for seed, inputs in cases]
    forwards: list[int] = []
    got = together([Request(pipe, seed, height=32, width=32, guidance_scale=5.0, **inputs)
                    for seed, inputs in cases], joins=[0, 1], forwards=forwards)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(e, g)
    assert forwards == []  # no shared forward: each ControlNet step ran alone


@pytest.mark.parametrize("variant", ["flux", "flux_base"])
def test_flux2_klein_requests_share_forwards_bit_exactly(variant, request):
    pipe = request.getfixturevalue(variant)
    fast = dict(height=32, width=32, max_sequence_length=32)
    guidance = {"flux": {}, "flux_base": {"guidance_scale": 4.0}}[variant]
    cases = [(1, dict(prompt="a red fox", num_inference_steps=2)),
             (2, dict(prompt="a blue cat", num_inference_steps=4)),
             (3, dict(prompt="a tree", num_inference_steps=3))]
    expected = [alone(pipe, seed, **fast, **guidance, **inputs) for seed, inputs in cases]
    forwards: list[int] = []
    got = together([Request(pipe, seed, **fast, **guidance, **inputs) for seed, inputs in cases],
                   joins=[0, 1, 1], forwards=forwards)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(e, g)
    assert max(forwards) == 3


def test_a_failing_request_fails_alone_and_its_step_mates_go_on(sd):
    inputs = dict(prompt="x", num_inference_steps=2, height=32, width=32, guidance_scale=5.0)
    good, bad = Request(sd, 1, **inputs), Request(sd, 2, **inputs)
    expected = alone(sd, 1, **inputs)
    with torch.inference_mode(), batch_invariant():
        good.begin(), bad.begin()
        bad.loop.block_state.latents = bad.loop.block_state.latents[:, :2]  # wrong channels
        errors = step_together([good.loop, bad.loop], same_layout=True)
        assert errors[0] is None and isinstance(errors[1], Exception)
        assert bad.loop.i == 0 and good.loop.i == 1
        while not good.loop.done:
            step_together([good.loop], same_layout=True)
    assert np.array_equal(good.end(), expected)


def test_a_forward_plan_can_split_a_group_into_sub_forwards(sd):
    inputs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=5.0)
    requests = [Request(sd, seed, prompt=f"p{seed}", **inputs) for seed in (1, 2, 3)]
    forwards: list[int] = []
    with torch.inference_mode(), batch_invariant():
        loops = [request.begin() for request in requests]
        while not loops[0].done:  # the plan a cache would make: one full, the rest apart
            step_together(loops, plan=lambda members: [[0], list(range(1, len(members)))],
                          on_forward=lambda n, rows, s: forwards.append(n), same_layout=True)
    assert forwards == [1, 2, 1, 2]
    for seed, request in zip((1, 2, 3), requests, strict=True):
        assert np.array_equal(request.end(), alone(sd, seed, prompt=f"p{seed}", **inputs))
