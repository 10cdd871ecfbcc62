"""Stable Diffusion blocks against diffusers' pipelines on the same tiny checkpoints.

Both sides load the same random-weight checkpoint in float32 on the CPU and run with the same
inputs and seed; the images (`output_type="np"`) must agree to 1e-4 (they are in fact equal).
Covered: text-to-image, image-to-image, inpainting with 4- and 9-channel UNets, ControlNet, five
schedulers, a guidance-distilled UNet, and batching with one generator per image.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from blocks import GenerationCancelled, ModularPipeline
from blocks.stable_diffusion import StableDiffusionAutoBlocks, StableDiffusionControlNetAutoBlocks
from blocks.stable_diffusion.tiny_model import write_tiny_sd

PROMPT = "a red circle on a blue background"
IMAGES_TOL = 1e-4
STEPS = {"num_inference_steps": 2}


# -- fixtures -----------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "ckpt", controlnet=True)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd_inpaint") / "ckpt", inpaint=True)


def _ours(path: pathlib.Path, blocks=None) -> ModularPipeline:
    if blocks is None:
        pipe = ModularPipeline.from_pretrained(str(path))
    else:
        pipe = blocks.init_pipeline(str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(sd_dir: pathlib.Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)  # float32
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_img2img(reference) -> StableDiffusionImg2ImgPipeline:
    pipe = StableDiffusionImg2ImgPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_inpaint(reference) -> StableDiffusionInpaintPipeline:
    pipe = StableDiffusionInpaintPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_inpaint9(inpaint_dir: pathlib.Path) -> StableDiffusionInpaintPipeline:
    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpaint_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_controlnet(reference, sd_dir: pathlib.Path) -> StableDiffusionControlNetPipeline:
    controlnet = ControlNetModel.from_pretrained(sd_dir / "controlnet")
    pipe = StableDiffusionControlNetPipeline(**reference.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(sd_dir: pathlib.Path) -> ModularPipeline:
    return _ours(sd_dir)


@pytest.fixture(scope="module")
def pipe_inpaint9(inpaint_dir: pathlib.Path) -> ModularPipeline:
    return _ours(inpaint_dir)


@pytest.fixture(scope="module")
def pipe_controlnet(sd_dir: pathlib.Path) -> ModularPipeline:
    return _ours(sd_dir, StableDiffusionControlNetAutoBlocks())


def _image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(width: int = 48, height: int = 40) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 :, width // 3 : 3 * width // 4] = 255  # white = repaint
    return Image.fromarray(mask)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _assert_parity(reference, pipe, generator=_generator, ours=None, **kwargs) -> None:
    """Both pipelines give the same images for `kwargs`; `ours` overrides our inputs."""
    expected = reference(**kwargs, generator=generator(), output_type="np").images
    got = pipe(**{**kwargs, **(ours or {})}, generator=generator(), output_type="np").images
    assert _max_diff(expected, got) <= IMAGES_TOL


# -- text to image ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({"negative_prompt": "blurry, low quality"}, id="negative-prompt"),
        pytest.param({"guidance_scale": 1.0}, id="no-guidance"),
        pytest.param({"guidance_scale": 0.5, "negative_prompt": "ignored"}, id="guidance-below-1"),
        pytest.param({"num_images_per_prompt": 2}, id="two-per-prompt"),
        pytest.param({"prompt": ["a cat", "a dog on grass"],
                      "negative_prompt": ["blurry", "watermark"]}, id="two-prompts"),
        pytest.param({"height": 48, "width": 32}, id="tall"),
        pytest.param({"guidance_rescale": 0.7}, id="guidance-rescale"),
        pytest.param({"num_inference_steps": 3, "timesteps": [999, 500, 1]}, id="custom-timesteps"),
    ],
)
def test_text2image_matches_diffusers(reference, pipe, kwargs):
    if "timesteps" in kwargs:
        # EulerDiscreteScheduler takes custom timesteps; both sides then ignore the step count.
        kwargs = {k: v for k, v in kwargs.items() if k != "num_inference_steps"}
    _assert_parity(reference, pipe, **{"prompt": PROMPT, **STEPS, **kwargs})


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(sd_dir, pipe, clip_skip):
    reference = StableDiffusionPipeline.from_pretrained(sd_dir)
    reference.set_progress_bar_config(disable=True)
    # diffusers reaches for `text_encoder.text_model.final_layer_norm`, which transformers 5
    # flattened into the text encoder itself; point it there.
    object.__setattr__(reference.text_encoder, "text_model", reference.text_encoder)
    _assert_parity(reference, pipe, prompt=PROMPT, clip_skip=clip_skip, **STEPS)
    plain = pipe(prompt=PROMPT, generator=_generator(), output_type="np", **STEPS).images
    skipped = pipe(prompt=PROMPT, clip_skip=clip_skip, generator=_generator(), output_type="np",
                   **STEPS).images
    assert _max_diff(plain, skipped) > 1e-3  # it really takes another layer


def test_generator_list_matches_diffusers(reference, pipe):
    def generators():
        return [_generator(1), _generator(2)]

    _assert_parity(reference, pipe, generator=generators, prompt=PROMPT,
                   num_images_per_prompt=2, **STEPS)


def test_pil_output_matches_diffusers(sd_dir, reference):
    # The README path: from_pretrained -> load_components -> pipe(...).images[0].
    pipe = ModularPipeline.from_pretrained(str(sd_dir))
    assert type(pipe.blocks) is StableDiffusionAutoBlocks
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, num_inference_steps=2, generator=_generator()).images[0]
    expected = reference(prompt=PROMPT, num_inference_steps=2, generator=_generator()).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)  # UNet 8 x VAE factor 4
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_latent_output_matches_diffusers(reference, pipe):
    kwargs = {"prompt": PROMPT, **STEPS, "output_type": "latent"}
    expected = reference(**kwargs, generator=_generator()).images
    got = pipe(**kwargs, generator=_generator()).images
    assert got.shape == (1, 4, 8, 8)
    assert _max_diff(expected, got) <= IMAGES_TOL


# -- image to image -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default-strength"),
        pytest.param({"strength": 0.5, "num_inference_steps": 4}, id="half-strength"),
        pytest.param({"strength": 1.0}, id="full-strength"),
        pytest.param({"num_images_per_prompt": 2, "negative_prompt": "blurry"},
                     id="two-per-prompt"),
        pytest.param({"prompt": ["a cat", "a dog"]}, id="two-prompts"),
        pytest.param({"guidance_scale": 1.0}, id="no-guidance"),
        pytest.param({"image": _image(50, 37)}, id="size-rounded-down"),
    ],
)
def test_image2image_matches_diffusers(reference_img2img, pipe, kwargs):
    _assert_parity(reference_img2img, pipe, **{"prompt": PROMPT, "image": _image(), **STEPS,
                                               **kwargs})


def test_image2image_generator_list_matches_diffusers(reference_img2img, pipe):
    def generators():
        return [_generator(1), _generator(2)]

    _assert_parity(reference_img2img, pipe, generator=generators, prompt=PROMPT, image=_image(),
                   strength=0.7, num_images_per_prompt=2, **STEPS)


# -- inpainting ---------------------------------------------------------------------------------


INPAINT_CASES = [
    pytest.param({}, id="full-strength"),
    pytest.param({"strength": 0.6, "num_inference_steps": 4}, id="partial-strength"),
    pytest.param({"num_images_per_prompt": 2}, id="two-per-prompt"),
    pytest.param({"guidance_scale": 1.0}, id="no-guidance"),
    pytest.param({"height": 40, "width": 48}, id="explicit-size"),
]


@pytest.mark.parametrize("kwargs", INPAINT_CASES)
def test_inpaint_4channel_matches_diffusers(reference_inpaint, pipe, kwargs):
    _assert_parity(reference_inpaint, pipe, **{
        "prompt": PROMPT, "image": _image(), "mask_image": _mask(), **STEPS, **kwargs
    })


@pytest.mark.parametrize("kwargs", INPAINT_CASES)
def test_inpaint_9channel_matches_diffusers(reference_inpaint9, pipe_inpaint9, kwargs):
    assert pipe_inpaint9.unet.config.in_channels == 9
    _assert_parity(reference_inpaint9, pipe_inpaint9, **{
        "prompt": PROMPT, "image": _image(), "mask_image": _mask(), **STEPS, **kwargs
    })


def test_inpaint_keeps_the_unmasked_region(pipe):
    image, mask = _image(32, 32), _mask(32, 32)
    out = pipe(prompt=PROMPT, image=image, mask_image=mask, generator=_generator(),
               output_type="np", **STEPS).images[0]
    other = pipe(prompt="a green square", image=image, mask_image=mask, generator=_generator(7),
                 output_type="np", **STEPS).images[0]
    keep = np.asarray(mask) == 0
    repaint = ~keep
    # 4-channel UNets blend the image latents back in: outside the mask the two generations
    # agree far more closely than inside it.
    assert np.abs(out - other)[keep].mean() < 0.5 * np.abs(out - other)[repaint].mean()


# -- ControlNet ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({"guidance_scale": 1.0}, id="no-guidance"),
        pytest.param({"num_images_per_prompt": 2, "negative_prompt": "blurry"},
                     id="two-per-prompt"),
        pytest.param({"prompt": ["a cat", "a dog"]}, id="two-prompts"),
        pytest.param({"controlnet_conditioning_scale": 0.5, "control_guidance_start": 0.25,
                      "control_guidance_end": 0.75, "num_inference_steps": 4}, id="schedule"),
        pytest.param({"guess_mode": True, "guidance_scale": 3.0}, id="guess-mode"),
        pytest.param({"height": 32, "width": 32}, id="resized"),
    ],
)
def test_controlnet_matches_diffusers(reference_controlnet, pipe_controlnet, kwargs):
    control = _image(seed=3)
    _assert_parity(reference_controlnet, pipe_controlnet, ours={"control_image": control},
                   **{"prompt": PROMPT, "image": control, **STEPS, **kwargs})


def test_controlnet_changes_the_image(pipe_controlnet):
    kwargs = {"prompt": PROMPT, "control_image": _image(seed=3), "output_type": "np", **STEPS}
    full = pipe_controlnet(**kwargs, generator=_generator()).images
    off = pipe_controlnet(**kwargs, controlnet_conditioning_scale=0.0,
                          generator=_generator()).images
    assert _max_diff(full, off) > 1e-3


# -- schedulers ---------------------------------------------------------------------------------


SCHEDULERS = [
    pytest.param(EulerDiscreteScheduler, {}, id="euler"),
    pytest.param(EulerAncestralDiscreteScheduler, {}, id="euler-ancestral"),
    pytest.param(DDIMScheduler, {"eta": 0.5}, id="ddim-eta"),
    pytest.param(DPMSolverMultistepScheduler, {}, id="dpmpp-2m"),
    pytest.param(LCMScheduler, {"guidance_scale": 1.0}, id="lcm"),
]


@pytest.mark.parametrize(("scheduler_class", "scheduler_kwargs"), SCHEDULERS)
@pytest.mark.parametrize("workflow", ["text2image", "image2image", "inpaint"])
def test_schedulers_match_diffusers(sd_dir, reference, scheduler_class, scheduler_kwargs,
                                    workflow):
    reference_class = {
        "text2image": StableDiffusionPipeline,
        "image2image": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }[workflow]
    expected_pipe = reference_class(**reference.components)
    # Swapped in after construction, as diffusers documents: its constructor would also
    # "fix" legacy scheduler configs (DDIM's clip_sample), which is not this test's concern.
    expected_pipe.scheduler = scheduler_class.from_config(reference.scheduler.config)
    expected_pipe.set_progress_bar_config(disable=True)
    pipe = _ours(sd_dir)
    pipe.update_components(scheduler=scheduler_class.from_config(pipe.scheduler.config))
    inputs = {"text2image": {}, "image2image": {"image": _image(), "strength": 0.7},
              "inpaint": {"image": _image(), "mask_image": _mask()}}[workflow]
    _assert_parity(expected_pipe, pipe, prompt=PROMPT, num_inference_steps=3,
                   **inputs, **scheduler_kwargs)


# -- guidance-distilled UNets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The tiny checkpoint with a UNet that takes a guidance embedding, as LCM-distilled UNets."""
    path = write_tiny_sd(tmp_path_factory.mktemp("sd_lcm") / "ckpt")
    config = dict(UNet2DConditionModel.load_config(path / "unet"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 16})
    unet.save_pretrained(path / "unet")
    return path


def test_guidance_embedding_matches_diffusers(lcm_dir):
    reference = StableDiffusionPipeline.from_pretrained(lcm_dir)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    pipe = _ours(lcm_dir)
    pipe.update_components(scheduler=LCMScheduler.from_config(pipe.scheduler.config))
    # guidance_scale > 1 is embedded, not run as classifier-free guidance.
    _assert_parity(reference, pipe, prompt=PROMPT, guidance_scale=6.0, **STEPS)
    state = pipe(prompt=PROMPT, guidance_scale=6.0, generator=_generator(), output_type="latent",
                 **STEPS)
    assert state.timestep_cond.shape == (1, 16)


# -- batching -----------------------------------------------------------------------------------


BATCH_CASES = [
    pytest.param({}, id="text2image"),
    pytest.param({"image": _image(), "strength": 0.7}, id="image2image"),
    pytest.param({"image": _image(), "mask_image": _mask()}, id="inpaint"),
    pytest.param({"image": _image(), "mask_image": _mask(), "strength": 0.7},
                 id="inpaint-partial"),
]


@pytest.mark.parametrize("kwargs", BATCH_CASES)
def test_batching_never_changes_an_image(sd_dir, kwargs):
    pipe = _ours(sd_dir)
    # An ancestral scheduler draws from the generators every step too.
    pipe.update_components(
        scheduler=EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    )
    kwargs = {"prompt": PROMPT, "output_type": "np", **STEPS, **kwargs}
    batch = pipe(**kwargs, num_images_per_prompt=2,
                 generator=[_generator(1), _generator(2)]).images
    for i, seed in enumerate((1, 2)):
        alone = pipe(**kwargs, generator=_generator(seed)).images
        assert _max_diff(batch[i : i + 1], alone) <= IMAGES_TOL


def test_batched_inpainting_matches_diffusers_image_by_image(reference_inpaint9, pipe_inpaint9):
    # diffusers samples one input image's VAE posterior with the first generator only, so its
    # batch would change image 2; each of our images is diffusers' image made alone.
    kwargs = {"prompt": PROMPT, "image": _image(), "mask_image": _mask(), "output_type": "np",
              **STEPS}
    batch = pipe_inpaint9(**kwargs, num_images_per_prompt=2,
                          generator=[_generator(1), _generator(2)]).images
    for i, seed in enumerate((1, 2)):
        alone = reference_inpaint9(**kwargs, generator=_generator(seed)).images
        assert _max_diff(batch[i : i + 1], alone) <= IMAGES_TOL


# -- callbacks and errors -----------------------------------------------------------------------


def test_callback_sees_every_step_and_can_cancel(pipe):
    seen = []

    def record(step, timestep, block_state):
        seen.append((step, int(timestep), tuple(block_state.latents.shape)))

    pipe(prompt=PROMPT, num_inference_steps=3, callback_on_step_end=record,
         generator=_generator(), output_type="latent")
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(shape == (1, 4, 8, 8) for *_, shape in seen)

    def cancel_after_first(step, timestep, block_state):
        return step == 0

    for extra in ({}, {"image": _image(), "mask_image": _mask()}):
        with pytest.raises(GenerationCancelled, match="after step 1 of 3"):
            pipe(prompt=PROMPT, num_inference_steps=3, callback_on_step_end=cancel_after_first,
                 generator=_generator(), **extra)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": 1.5, "image": _image()}, r"set_timesteps: strength must be in \[0, 1\]"),
        ({"height": 30}, r"prepare_latents: height and width must be positive multiples of 4"),
        ({"generator": [torch.Generator()] * 3},
         r"denoise\.prepare_latents: got 3 generators for a batch of 1"),
        ({"output_type": "jpeg"}, r"decode: output_type 'jpeg' is not one of"),
        ({"prompt": 3}, r"text_encoder: prompt must be a string"),
        ({"negative_prompt": ["a", "b"]}, r"got 2 negative prompts for 1 prompts"),
        ({"control_image": _image()}, r"does not use input 'control_image'"),
    ],
)
def test_bad_inputs_name_the_block(pipe, kwargs, message):
    kwargs = {"prompt": PROMPT, **STEPS, **kwargs}
    if "control_image" in kwargs:
        with pytest.warns(UserWarning, match=message):
            pipe(**kwargs, generator=_generator())
        return
    with pytest.raises(ValueError, match=message):
        pipe(**{"generator": _generator(), **kwargs})
