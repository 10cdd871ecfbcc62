"""Stable Diffusion XL blocks against diffusers' SDXL pipelines on the same tiny checkpoints.

The checkpoints are written by `write_tiny_sdxl`, opened by diffusers' `StableDiffusionXLPipeline`
and saved again by it (`save_pretrained`): both sides then load what diffusers saved, in float32
on the CPU, and run with the same inputs and seed; the images (`output_type="np"`) must agree to
1e-4 (they are in fact equal). Covered: text-to-image, image-to-image, inpainting with 4- and
9-channel UNets, both prompts, micro-conditioning and its negative variants, the five
schedulers the service offers, ControlNet, and one generator per image.
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
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from blocks import ModularPipeline
from blocks.errors import InvalidInput
from blocks.stable_diffusion_xl import (
    StableDiffusionXLAutoBlocks,
    StableDiffusionXLControlNetAutoBlocks,
)
from blocks.stable_diffusion_xl.tiny_model import write_tiny_sdxl

PROMPT = "a red circle on a blue background"
IMAGES_TOL = 1e-4
STEPS = {"num_inference_steps": 2}

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


# -- fixtures -----------------------------------------------------------------------------------


def _saved_by_diffusers(written: pathlib.Path, pipeline_class: type) -> pathlib.Path:
    """The checkpoint as diffusers saves it after opening `written`."""
    saved = written.parent / "saved"
    pipeline_class.from_pretrained(written, add_watermarker=False).save_pretrained(saved)
    return saved


@pytest.fixture(scope="module")
def written_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "ckpt", controlnet=True)


@pytest.fixture(scope="module")
def sdxl_dir(written_dir: pathlib.Path) -> pathlib.Path:
    return _saved_by_diffusers(written_dir, StableDiffusionXLPipeline)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    written = write_tiny_sdxl(tmp_path_factory.mktemp("sdxl_inpaint") / "ckpt", inpaint=True)
    return _saved_by_diffusers(written, StableDiffusionXLInpaintPipeline)


def _ours(path: pathlib.Path, blocks=None) -> ModularPipeline:
    pipe = ModularPipeline.from_pretrained(str(path)) if blocks is None else blocks.init_pipeline(
        str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipeline_class: type, **components):
    pipe = pipeline_class(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(sdxl_dir: pathlib.Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_img2img(reference) -> StableDiffusionXLImg2ImgPipeline:
    return _reference(StableDiffusionXLImg2ImgPipeline, **reference.components)


@pytest.fixture(scope="module")
def reference_inpaint(reference) -> StableDiffusionXLInpaintPipeline:
    return _reference(StableDiffusionXLInpaintPipeline, **reference.components)


@pytest.fixture(scope="module")
def reference_inpaint9(inpaint_dir: pathlib.Path) -> StableDiffusionXLInpaintPipeline:
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(inpaint_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(sdxl_dir: pathlib.Path) -> ModularPipeline:
    return _ours(sdxl_dir)


@pytest.fixture(scope="module")
def pipe_inpaint9(inpaint_dir: pathlib.Path) -> ModularPipeline:
    return _ours(inpaint_dir)


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

TWO_PROMPTS = {"prompt": ["a cat", "a dog on grass"], "num_images_per_prompt": 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({"negative_prompt": "blurry, low quality"}, id="negative-prompt"),
        pytest.param({**TWO_PROMPTS, "height": 48, "width": 32}, id="two-prompts-x2-tall"),
        pytest.param({**TWO_PROMPTS, "negative_prompt": ["blurry", "watermark"], "height": 32,
                      "width": 48}, id="two-prompts-x2-negatives-wide"),
        pytest.param({"prompt_2": "a photo", "negative_prompt": "blurry",
                      "negative_prompt_2": "text"}, id="second-prompts"),
        pytest.param({"guidance_scale": 1.0}, id="no-guidance"),
        pytest.param({"clip_skip": 1}, id="clip-skip"),
        pytest.param({"guidance_rescale": 0.7}, id="guidance-rescale"),
        pytest.param({"original_size": (64, 96), "crops_coords_top_left": (8, 4),
                      "target_size": (40, 48)}, id="micro-conditioning"),
        pytest.param({"negative_original_size": (16, 16), "negative_crops_coords_top_left": (2, 0),
                      "negative_target_size": (48, 48), "height": 32, "width": 48},
                     id="negative-micro-conditioning"),
    ],
)
def test_text2image_matches_diffusers(reference, pipe, kwargs):
    _assert_parity(reference, pipe, **{"prompt": PROMPT, **STEPS, **kwargs})


def test_no_forced_zero_negatives_matches_diffusers(reference, pipe):
    reference = _reference(StableDiffusionXLPipeline, **reference.components,
                           force_zeros_for_empty_prompt=False)
    pipe.update_components(force_zeros_for_empty_prompt=False)
    try:
        _assert_parity(reference, pipe, prompt=PROMPT, **STEPS)
    finally:
        pipe.update_components(force_zeros_for_empty_prompt=True)


def test_generator_list_and_latents_match_diffusers(reference, pipe):
    def generators():
        return [_generator(1), _generator(2)]

    _assert_parity(reference, pipe, generator=generators, prompt=PROMPT,
                   num_images_per_prompt=2, **STEPS)
    kwargs = {"prompt": PROMPT, **STEPS, "output_type": "latent"}
    expected = reference(**kwargs, generator=_generator()).images
    got = pipe(**kwargs, generator=_generator()).images
    assert got.shape == (1, 4, 8, 8)
    assert _max_diff(expected, got) <= IMAGES_TOL


def test_pil_output_and_family_match_diffusers(reference, pipe):
    # The README path: from_pretrained -> load_components -> pipe(...).images[0].
    assert type(pipe.blocks) is StableDiffusionXLAutoBlocks
    image = pipe(prompt=PROMPT, generator=_generator(), **STEPS).images[0]
    expected = reference(prompt=PROMPT, generator=_generator(), **STEPS).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)  # UNet 8 x VAE factor 4
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_batched_negative_micro_conditioning_matches_diffusers_image_by_image(reference, pipe):
    # diffusers' text-to-image pipeline gives a batch's rows alternating negative and positive
    # time ids, so its batch changes the images; each of ours is diffusers' image made alone.
    kwargs = {"prompt": PROMPT, "negative_original_size": (16, 16),
              "negative_target_size": (16, 24), "output_type": "np", **STEPS}
    batch = pipe(**kwargs, num_images_per_prompt=2,
                 generator=[_generator(1), _generator(2)]).images
    for i, seed in enumerate((1, 2)):
        alone = reference(**kwargs, generator=_generator(seed)).images
        assert _max_diff(batch[i : i + 1], alone) <= IMAGES_TOL


@pytest.mark.parametrize("negative", [
    {"negative_original_size": (16, 16)},
    {"negative_crops_coords_top_left": (4, 4)},
    {"negative_target_size": (16, 24)},
])
def test_each_negative_micro_conditioning_is_used(pipe, negative):
    # diffusers' text-to-image pipeline ignores a negative size given alone; here every value
    # given is used (see blocks.stable_diffusion_xl.before_denoise).
    kwargs = {"prompt": PROMPT, "output_type": "np", **STEPS}
    plain = pipe(**kwargs, generator=_generator()).images
    steered = pipe(**kwargs, **negative, generator=_generator()).images
    assert _max_diff(plain, steered) > 1e-3


# -- image to image -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"num_inference_steps": 4}, id="default-strength"),
        pytest.param({**TWO_PROMPTS, "strength": 0.6, "negative_prompt": "blurry"},
                     id="two-prompts-x2-negative"),
        pytest.param({"strength": 1.0, "guidance_scale": 1.0}, id="full-strength-no-guidance"),
        pytest.param({"image": _image(50, 37), "strength": 0.7, "original_size": (80, 80),
                      "negative_original_size": (24, 24)}, id="size-rounded-down-micro"),
    ],
)
def test_image2image_matches_diffusers(reference_img2img, pipe, kwargs):
    _assert_parity(reference_img2img, pipe, **{"prompt": PROMPT, "image": _image(), **STEPS,
                                               **kwargs})


# -- inpainting ---------------------------------------------------------------------------------


INPAINT_CASES = [
    pytest.param({}, id="default-strength"),
    pytest.param({"strength": 1.0}, id="full-strength"),
    pytest.param({"strength": 0.6, "num_inference_steps": 4}, id="partial-strength"),
    pytest.param({**TWO_PROMPTS, "negative_prompt": "blurry", "height": 48, "width": 32},
                 id="two-prompts-x2-tall"),
    pytest.param({"guidance_scale": 1.0}, id="no-guidance"),
]


@pytest.mark.parametrize("kwargs", INPAINT_CASES)
def test_inpaint_4channel_matches_diffusers(reference_inpaint, pipe, kwargs):
    # diffusers' SDXL inpainting defaults to guidance 7.5 where its other pipelines (and all
    # of ours) use 5.0: both sides are given one.
    _assert_parity(reference_inpaint, pipe, **{
        "prompt": PROMPT, "image": _image(), "mask_image": _mask(), "guidance_scale": 5.0,
        **STEPS, **kwargs,
    })


@pytest.mark.parametrize("kwargs", INPAINT_CASES[:2] + INPAINT_CASES[3:4])
def test_inpaint_9channel_matches_diffusers(reference_inpaint9, pipe_inpaint9, kwargs):
    assert pipe_inpaint9.unet.config.in_channels == 9
    _assert_parity(reference_inpaint9, pipe_inpaint9, **{
        "prompt": PROMPT, "image": _image(), "mask_image": _mask(), "guidance_scale": 5.0,
        **STEPS, **kwargs,
    })


# -- schedulers ---------------------------------------------------------------------------------


SCHEDULERS = [
    pytest.param(EulerDiscreteScheduler, {}, id="euler"),
    pytest.param(EulerAncestralDiscreteScheduler, {}, id="euler-ancestral"),
    pytest.param(DDIMScheduler, {"eta": 0.5}, id="ddim-eta"),
    pytest.param(DPMSolverMultistepScheduler, {}, id="dpmpp-2m"),
    pytest.param(LCMScheduler, {"guidance_scale": 1.0}, id="lcm"),
]
WORKFLOWS = {
    "text2image": (StableDiffusionXLPipeline, {}),
    "image2image": (StableDiffusionXLImg2ImgPipeline, {"image": _image(), "strength": 0.7}),
    "inpaint": (StableDiffusionXLInpaintPipeline,
                {"image": _image(), "mask_image": _mask(), "guidance_scale": 5.0}),
}


# Every scheduler on text-to-image; the edits with the two that draw noise while stepping or
# keep a multistep history.
SCHEDULER_CASES = [
    *[pytest.param("text2image", *case.values, id=f"text2image-{case.id}") for case in SCHEDULERS],
    *[pytest.param(workflow, *SCHEDULERS[index].values, id=f"{workflow}-{SCHEDULERS[index].id}")
      for workflow in ("image2image", "inpaint") for index in (1, 3)],
]


@pytest.mark.parametrize(("workflow", "scheduler_class", "scheduler_kwargs"), SCHEDULER_CASES)
def test_schedulers_match_diffusers(reference, pipe, workflow, scheduler_class,
                                    scheduler_kwargs):
    reference_class, inputs = WORKFLOWS[workflow]
    expected_pipe = _reference(reference_class, **reference.components)
    # Swapped in after construction, as diffusers documents.
    expected_pipe.scheduler = scheduler_class.from_config(reference.scheduler.config)
    default_scheduler = pipe.scheduler
    pipe.update_components(scheduler=scheduler_class.from_config(default_scheduler.config))
    try:
        _assert_parity(expected_pipe, pipe, prompt=PROMPT, num_inference_steps=3,
                       **{**inputs, **scheduler_kwargs})
    finally:
        pipe.update_components(scheduler=default_scheduler)


# -- ControlNet ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_controlnet(reference, written_dir) -> StableDiffusionXLControlNetPipeline:
    controlnet = ControlNetModel.from_pretrained(written_dir / "controlnet")
    return _reference(StableDiffusionXLControlNetPipeline, **reference.components,
                      controlnet=controlnet)


@pytest.fixture(scope="module")
def pipe_controlnet(sdxl_dir, written_dir) -> ModularPipeline:
    pipe = _ours(sdxl_dir, StableDiffusionXLControlNetAutoBlocks())
    pipe.update_components(controlnet=ControlNetModel.from_pretrained(written_dir / "controlnet"))
    return pipe


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({**TWO_PROMPTS, "negative_prompt": "blurry"}, id="two-prompts-x2"),
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


# -- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", [{}, {"image": _image(), "strength": 0.5},
                                    {"image": _image(), "mask_image": _mask()}],
                         ids=["text2image", "image2image", "inpaint"])
def test_float32_vae_beside_bfloat16_models(sdxl_dir, inputs):
    # How SDXL is run in half precision: its VAE overflows in float16 (force_upcast), so it
    # stays in float32 while the encoders and the UNet are halved.
    pipe = ModularPipeline.from_pretrained(str(sdxl_dir))
    pipe.load_components(dtype={"default": torch.bfloat16, "vae": torch.float32})
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=PROMPT, generator=_generator(), output_type="np", **STEPS,
                  **inputs).images
    assert images.dtype == np.float32 and np.isfinite(images).all() and images.std() > 0.01


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"original_size": (64,)}, "original_size",
         r"prepare_add_cond: original_size must be a pair"),
        ({"negative_crops_coords_top_left": (-1, 0)}, "negative_crops_coords_top_left",
         r"negative_crops_coords_top_left must be a pair of non-negative integers"),
        ({"prompt_2": ["a", "b"]}, "prompt_2", r"text_encoder: got 2 prompt_2 for 1 prompts"),
        ({"clip_skip": 3}, "clip_skip", r"text_encoder: clip_skip must be in 0\.\.2"),
        ({"strength": 1.5, "image": _image()}, "strength",
         r"set_timesteps: strength must be in \[0, 1\]"),
    ],
)
def test_bad_inputs_name_the_block_and_field(pipe, kwargs, param, message):
    # InvalidInput: the service answers 400 naming `param`.
    with pytest.raises(InvalidInput, match=message) as raised:
        pipe(**{"prompt": PROMPT, "generator": _generator(), **STEPS, **kwargs})
    assert raised.value.param == param
