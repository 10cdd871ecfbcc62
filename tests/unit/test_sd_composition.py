"""Composing Stable Diffusion pipelines: a depth ControlNet built by inserting a custom block and
switching the denoise branch, post-processing appended and removed, workflows, the registry.

Everything runs on tiny random-weight checkpoints; where diffusers has the same pipeline
(ControlNet) the images are compared with it.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from blocks import ModularPipeline
from blocks.families import blocks_for_index
from blocks.loading import CheckpointIndex
from blocks.postprocessing import ImageFilterBlock, UpscaleBlock
from blocks.stable_diffusion import (
    DepthProcessorBlock,
    StableDiffusionAutoBlocks,
    StableDiffusionControlNetAutoBlocks,
    StableDiffusionControlNetDenoiseStep,
)
from blocks.stable_diffusion.tiny_model import write_tiny_sd

PROMPT = "a photo of a cat sitting on a wooden table"
STEPS = {"num_inference_steps": 2}


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "ckpt", controlnet=True, depth=True)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_sd(tmp_path_factory.mktemp("sd_plain") / "ckpt")


def _image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pipe(blocks, path: pathlib.Path) -> ModularPipeline:
    pipe = blocks.init_pipeline(str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _depth_controlnet_blocks() -> StableDiffusionAutoBlocks:
    blocks = StableDiffusionAutoBlocks()
    blocks.sub_blocks.pop("vae_encoder")  # the image becomes a depth map, not latents
    before_denoise = list(blocks.sub_blocks).index("denoise")
    blocks.sub_blocks.insert("depth", DepthProcessorBlock(), before_denoise)
    blocks.sub_blocks["denoise"] = StableDiffusionControlNetDenoiseStep()
    return blocks


# -- a depth ControlNet from a custom block -----------------------------------------------------


def test_inserting_the_depth_block_changes_the_contract():
    plain = StableDiffusionAutoBlocks()
    blocks = _depth_controlnet_blocks()
    assert list(blocks.sub_blocks) == ["text_encoder", "depth", "denoise", "decode"]
    added = set(blocks.component_names) - set(plain.component_names)
    assert added == {"depth_processor", "depth_image_processor", "controlnet"}
    inputs = {p.name: p for p in blocks.inputs}
    # The depth block makes the control image from `image`, which is now required.
    assert "control_image" not in inputs and inputs["image"].required
    assert {"controlnet_conditioning_scale", "guess_mode"} <= set(inputs)
    assert {"strength", "mask_image"}.isdisjoint(inputs)  # no image2image or inpaint branch left
    text = repr(blocks)
    assert "depth (DepthProcessorBlock)" in text and "depth_processor (Depth" in text
    assert "vae_encoder" not in text


def test_depth_controlnet_pipeline_matches_diffusers(sd_dir):
    pipe = _pipe(_depth_controlnet_blocks(), sd_dir)
    assert pipe.null_component_names == []
    spec = pipe.component_specs["depth_image_processor"]
    assert (spec.pretrained_model_name_or_path, spec.subfolder) == (str(sd_dir), "depth_processor")
    image = _image()
    state = pipe(prompt=PROMPT, image=image, generator=_generator(), output_type="np", **STEPS)
    depth = state.control_image[0]
    assert depth.mode == "RGB" and depth.size == image.size
    pixels = np.asarray(depth)
    assert pixels.min() == 0 and pixels.max() == 255  # normalised
    assert state.images.shape == (1, 40, 48, 3)  # the input image's size

    reference = StableDiffusionControlNetPipeline.from_pretrained(
        sd_dir, controlnet=ControlNetModel.from_pretrained(sd_dir / "controlnet")
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(prompt=PROMPT, image=state.control_image, generator=_generator(),
                         output_type="np", **STEPS).images
    assert np.abs(expected - state.images).max() <= 1e-4


def test_depth_map_depends_on_the_image(sd_dir):
    pipe = _pipe(DepthProcessorBlock(), sd_dir)
    first = np.asarray(pipe(image=_image(seed=1)).control_image[0], dtype=float)
    second = np.asarray(pipe(image=_image(seed=2)).control_image[0], dtype=float)
    assert np.abs(first - second).mean() > 1.0


def test_components_outside_the_index_come_from_their_subfolder(plain_dir):
    # The plain checkpoint has no controlnet/ folder: the spec keeps no source, the other
    # components still load, and only the ControlNet branch asks for it.
    pipe = _pipe(StableDiffusionControlNetAutoBlocks(), plain_dir)
    assert pipe.component_specs["controlnet"].pretrained_model_name_or_path is None
    assert pipe.null_component_names == ["controlnet"]
    images = pipe(prompt=PROMPT, generator=_generator(), output_type="np", **STEPS).images
    assert images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="component 'controlnet' is not loaded and has no source"):
        pipe(prompt=PROMPT, control_image=_image(), **STEPS)


def test_workflow_loading_skips_the_controlnet(sd_dir):
    pipe = StableDiffusionControlNetAutoBlocks().init_pipeline(str(sd_dir))
    pipe.load_components(workflow="text2image", dtype=torch.float32)
    assert pipe.null_component_names == ["controlnet"]
    pipe.load_components(workflow="controlnet", dtype=torch.float32)
    assert pipe.null_component_names == []


# -- post-processing ----------------------------------------------------------------------------


def test_postprocessing_blocks_append_and_remove(sd_dir):
    blocks = StableDiffusionAutoBlocks()
    base_inputs = {p.name for p in blocks.inputs}
    pipe = _pipe(blocks, sd_dir)
    plain = pipe(prompt=PROMPT, generator=_generator(), **STEPS).images[0]

    blocks.sub_blocks["filter"] = ImageFilterBlock()
    blocks.sub_blocks["upscale"] = UpscaleBlock()
    assert list(blocks.sub_blocks)[-3:] == ["decode", "filter", "upscale"]
    added = {p.name for p in blocks.inputs} - base_inputs
    assert added == {"brightness", "contrast", "saturation", "sharpness", "scale"}
    assert "upscale (UpscaleBlock)" in repr(blocks)
    post = _pipe(blocks, sd_dir)
    upscaled = post(prompt=PROMPT, generator=_generator(), **STEPS).images[0]
    assert upscaled.size == (64, 64)
    # Filters at 1.0 change nothing: the result is the plain image, upscaled.
    expected = plain.resize((64, 64), Image.LANCZOS)
    assert np.array_equal(np.asarray(upscaled), np.asarray(expected))
    contrasted = post(prompt=PROMPT, contrast=1.5, scale=1, generator=_generator(),
                      **STEPS).images[0]
    assert contrasted.size == plain.size
    grey = np.asarray(plain, dtype=float).mean()
    spread = np.abs(np.asarray(contrasted, dtype=float) - grey).mean()
    assert spread > np.abs(np.asarray(plain, dtype=float) - grey).mean()

    blocks.sub_blocks.pop("filter")
    blocks.sub_blocks.pop("upscale")
    assert {p.name for p in blocks.inputs} == base_inputs
    again = _pipe(blocks, sd_dir)(prompt=PROMPT, generator=_generator(), **STEPS).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(plain))


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_postprocessing_keeps_the_output_type(sd_dir, output_type):
    blocks = StableDiffusionAutoBlocks()
    blocks.sub_blocks["filter"] = ImageFilterBlock()
    blocks.sub_blocks["upscale"] = UpscaleBlock()
    pipe = _pipe(blocks, sd_dir)
    images = pipe(prompt=PROMPT, num_images_per_prompt=2, saturation=0.0, scale=2,
                  generator=_generator(), output_type=output_type, **STEPS).images
    if output_type == "pil":
        assert [i.size for i in images] == [(64, 64)] * 2
        pixels = np.stack([np.asarray(i, dtype=float) / 255 for i in images])
    elif output_type == "np":
        assert images.shape == (2, 64, 64, 3)
        pixels = images
    else:
        assert isinstance(images, torch.Tensor) and images.shape == (2, 3, 64, 64)
        pixels = images.permute(0, 2, 3, 1).numpy()
    assert pixels.min() >= 0 and pixels.max() <= 1
    # saturation 0 makes the images grey: the channels agree (up to 8-bit rounding).
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2 / 255


def test_postprocessing_refuses_latents(sd_dir):
    blocks = StableDiffusionAutoBlocks()
    blocks.sub_blocks["upscale"] = UpscaleBlock()
    pipe = _pipe(blocks, sd_dir)
    with pytest.raises(ValueError, match="upscale: images must be PIL images"):
        pipe(prompt=PROMPT, output_type="latent", **STEPS)


# -- workflows and the registry -----------------------------------------------------------------


def test_workflows_run_the_expected_blocks():
    blocks = StableDiffusionControlNetAutoBlocks()
    assert blocks.available_workflows == ["text2image", "image2image", "inpaint", "controlnet"]
    names = {
        name: list(blocks.get_workflow(name).sub_blocks) for name in blocks.available_workflows
    }
    assert "vae_encoder.encode" not in names["text2image"]
    assert "denoise.prepare_mask_latents" in names["inpaint"]
    assert "denoise.controlnet_input" in names["controlnet"]
    assert names["image2image"] == [
        "text_encoder", "vae_encoder.preprocess", "vae_encoder.encode", "denoise.set_timesteps",
        "denoise.prepare_latents", "denoise.guidance_embedding", "denoise.loop", "decode",
    ]
    with pytest.raises(ValueError, match=r"unknown workflow 'foo'.*available: text2image"):
        blocks.get_workflow("foo")


def test_registry_maps_diffusers_pipelines_to_blocks():
    def blocks_for(class_name):
        return blocks_for_index(CheckpointIndex("probe", class_name, None))

    for name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                 "StableDiffusionInpaintPipeline"):
        assert type(blocks_for(name)) is StableDiffusionAutoBlocks
    controlnet = blocks_for("StableDiffusionControlNetPipeline")
    assert type(controlnet) is StableDiffusionControlNetAutoBlocks
    assert isinstance(controlnet, StableDiffusionAutoBlocks)


def test_save_and_reload_gives_the_same_image(plain_dir, tmp_path):
    pipe = ModularPipeline.from_pretrained(str(plain_dir))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = ModularPipeline.from_pretrained(str(tmp_path / "saved"))
    assert type(reloaded.blocks) is StableDiffusionAutoBlocks
    reloaded.load_components(dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    first = pipe(prompt=PROMPT, generator=_generator(), output_type="np", **STEPS).images
    second = reloaded(prompt=PROMPT, generator=_generator(), output_type="np", **STEPS).images
    assert np.array_equal(first, second)


def test_loading_on_first_use_gives_the_same_images(plain_dir):
    # Without load_components each model loads when a block first needs it; sizes are worked
    # out from the checkpoint's configs before the VAE or the UNet is loaded.
    eager = _pipe(StableDiffusionAutoBlocks(), plain_dir)
    kwargs = {"prompt": PROMPT, "output_type": "np", **STEPS}
    inpaint = {"image": _image(), "mask_image": _image(seed=5).convert("L")}
    for extra in ({}, inpaint):
        lazy = ModularPipeline.from_pretrained(str(plain_dir))
        lazy.set_progress_bar_config(disable=True)
        got = lazy(**kwargs, **extra, generator=_generator()).images
        expected = eager(**kwargs, **extra, generator=_generator()).images
        assert got.shape == (1, 32, 32, 3)  # the UNet's 8 latents x the VAE's factor 4
        assert np.array_equal(got, expected)
