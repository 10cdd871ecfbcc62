"""FLUX.2 [klein] blocks against diffusers' `Flux2KleinPipeline` on the same tiny checkpoint.

Both pipelines load the same random-weight checkpoint in float32 on the CPU and run with the
same prompt, size, steps and seed; text embeddings, final latents and images must agree.
Most cases use a short `max_sequence_length` to stay fast; one runs at the default 512.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

from blocks import GenerationCancelled, ModularPipeline
from blocks.flux2 import Flux2KleinAutoBlocks, Flux2KleinTextEncoderStep
from blocks.flux2.encoders import preprocess_reference_image
from blocks.flux2.tiny_model import write_tiny_flux2_klein

PROMPT = "a red circle on a blue background"
FAST = {"num_inference_steps": 2, "height": 32, "width": 32, "max_sequence_length": 32}
EMBEDS_TOL = 1e-5
LATENTS_TOL = 1e-4
IMAGES_TOL = 1e-4


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_flux2_klein(tmp_path_factory.mktemp("klein"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_flux2_klein(tmp_path_factory.mktemp("klein_base"), base=True)


def _reference(path: pathlib.Path) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(path)  # float32
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(path: pathlib.Path) -> ModularPipeline:
    pipe = ModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(distilled_dir: pathlib.Path) -> Flux2KleinPipeline:
    return _reference(distilled_dir)


@pytest.fixture(scope="module")
def pipe(distilled_dir: pathlib.Path) -> ModularPipeline:
    return _ours(distilled_dir)


@pytest.fixture(scope="module")
def reference_base(base_dir: pathlib.Path) -> Flux2KleinPipeline:
    return _reference(base_dir)


@pytest.fixture(scope="module")
def pipe_base(base_dir: pathlib.Path) -> ModularPipeline:
    return _ours(base_dir)


def _reference_image(width: int = 96, height: int = 80, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_diff(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(x)) for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def _assert_parity(reference, pipe, **kwargs) -> None:
    """Final latents and decoded images of both pipelines agree for `kwargs`."""
    for output_type, tol in (("latent", LATENTS_TOL), ("np", IMAGES_TOL)):
        expected = reference(**kwargs, generator=_generator(), output_type=output_type).images
        ours = pipe(**kwargs, generator=_generator(), output_type=output_type).images
        assert _max_diff(expected, ours) <= tol, output_type


# -- text embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "num_images_per_prompt", "max_sequence_length", "layers"),
    [
        (PROMPT, 1, 32, (9, 18, 27)),
        (["a cat", "a dog on grass"], 2, 64, (9, 18, 27)),
        (PROMPT, 1, 512, (9, 18, 27)),
        (PROMPT, 1, 32, (1, 14, 28)),
    ],
)
def test_prompt_embeddings_match(
    distilled_dir, reference, prompt, num_images_per_prompt, max_sequence_length, layers
):
    step = Flux2KleinTextEncoderStep().init_pipeline(str(distilled_dir))
    step.load_components(dtype=torch.float32)
    assert sorted(n for n, c in step.components.items() if c is not None) == [
        "text_encoder", "tokenizer"
    ]
    state = step(prompt=prompt, num_images_per_prompt=num_images_per_prompt,
                 max_sequence_length=max_sequence_length, text_encoder_out_layers=layers)
    with torch.no_grad():
        expected, expected_ids = reference.encode_prompt(
            prompt=prompt, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, text_encoder_out_layers=layers,
        )
    assert _max_diff(expected, state.prompt_embeds) <= EMBEDS_TOL
    assert torch.equal(expected_ids, state.text_ids)
    assert state.batch_size == expected.shape[0]
    assert state.negative_prompt_embeds is None  # distilled: no guidance


# -- generation parity --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="square"),
        pytest.param({"height": 48, "width": 32}, id="tall"),
        pytest.param({"height": 32, "width": 64}, id="wide"),
        pytest.param({"prompt": ["a red circle", "a green square"]}, id="two-prompts"),
        pytest.param({"num_images_per_prompt": 2}, id="two-per-prompt"),
        pytest.param({"num_inference_steps": 3, "guidance_scale": 1.0}, id="three-steps"),
    ],
)
def test_text2image_matches_diffusers(reference, pipe, kwargs):
    _assert_parity(reference, pipe, **{"prompt": PROMPT, **FAST, **kwargs})


def test_default_sequence_length_matches_diffusers(reference, pipe):
    kwargs = {**FAST, "prompt": PROMPT}
    del kwargs["max_sequence_length"]  # 512 on both sides
    _assert_parity(reference, pipe, **kwargs)


def test_pil_output_matches_diffusers(distilled_dir, reference):
    # The README path: from_pretrained -> load_components -> pipe(...).images[0].
    pipe = ModularPipeline.from_pretrained(str(distilled_dir))
    assert isinstance(pipe.blocks, Flux2KleinAutoBlocks)
    assert pipe.config["is_distilled"] is True
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, num_inference_steps=2, generator=_generator(),
                 height=32, width=32).images[0]
    expected = reference(prompt=PROMPT, num_inference_steps=2, generator=_generator(),
                         height=32, width=32).images[0]
    assert isinstance(image, PIL.Image.Image) and image.size == (32, 32)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="size-from-image"),
        pytest.param({"height": 32, "width": 48}, id="explicit-size"),
        pytest.param({"num_images_per_prompt": 2, "height": 32, "width": 32}, id="batch"),
    ],
)
def test_image_conditioned_matches_diffusers(reference, pipe, kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "max_sequence_length": 32,
              "image": _reference_image(), **kwargs}
    _assert_parity(reference, pipe, **kwargs)


def test_two_reference_images_match_diffusers(reference, pipe):
    images = [_reference_image(96, 80, seed=1), _reference_image(64, 72, seed=2)]
    _assert_parity(reference, pipe, prompt=PROMPT, image=images, **FAST)


def test_image_conditioned_runs_the_image_branch(pipe):
    state = pipe(prompt=PROMPT, image=_reference_image(), generator=_generator(),
                 output_type="latent", **FAST)
    assert [tuple(x.shape) for x in state.image_latents] == [(1, 16, 5, 6)]  # 80x96 px / 16
    assert state.condition_ids[0, :, 0].unique().tolist() == [10]
    assert state.images.shape == (1, 4, 4, 4)  # VAE latents of the 32x32 output


def test_base_model_with_guidance_matches_diffusers(reference_base, pipe_base):
    assert pipe_base.config["is_distilled"] is False
    kwargs = {**FAST, "prompt": ["a red circle", "a green square"], "guidance_scale": 4.0}
    state = pipe_base(**kwargs, generator=_generator(), output_type="latent")
    assert state.negative_prompt_embeds.shape == state.prompt_embeds.shape
    _assert_parity(reference_base, pipe_base, **kwargs)


def test_base_model_without_guidance_matches_diffusers(reference_base, pipe_base):
    state = pipe_base(prompt=PROMPT, guidance_scale=1.0, generator=_generator(),
                      output_type="latent", **FAST)
    assert state.negative_prompt_embeds is None
    _assert_parity(reference_base, pipe_base, prompt=PROMPT, guidance_scale=1.0, **FAST)


def test_guidance_changes_the_base_model_output(pipe_base):
    def latents(scale):
        return pipe_base(prompt=PROMPT, guidance_scale=scale, generator=_generator(),
                         output_type="latent", **FAST).images
    assert _max_diff(latents(1.0), latents(4.0)) > 1e-3


def test_reference_preprocessing_matches_diffusers():
    # Large images are shrunk to 1024^2 px first; odd sizes are centre-cropped, not resized.
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    for width, height in ((1100, 1000), (200, 90), (64, 500)):
        image = _reference_image(width, height)
        if width * height > 1024 * 1024:
            image_for_reference = processor._resize_to_target_area(image, 1024 * 1024)
        else:
            image_for_reference = image
        w, h = image_for_reference.size
        expected = processor.preprocess(image_for_reference, height=h // 16 * 16,
                                        width=w // 16 * 16, resize_mode="crop")
        ours = preprocess_reference_image(image, 16, "test")
        assert torch.equal(expected, ours), (width, height)


def test_reference_images_are_checked(pipe):
    with pytest.raises(ValueError, match=r"preprocess: reference image is 40x80; .*64 px"):
        pipe(prompt=PROMPT, image=_reference_image(40, 80), **FAST)
    with pytest.raises(ValueError, match=r"vae_encoder.preprocess: reference images must be PIL"):
        pipe(prompt=PROMPT, image=np.zeros((64, 64, 3)), **FAST)


# -- batching, callbacks, progress --------------------------------------------------------------


def test_batching_never_changes_an_image(reference, pipe):
    prompts = ["a red circle", "a green square", "a blue sky"]
    seeds = [11, 22, 33]
    batch = pipe(prompt=prompts, generator=[_generator(s) for s in seeds],
                 output_type="np", **FAST).images
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        solo = pipe(prompt=prompt, generator=_generator(seed), output_type="np", **FAST).images
        assert _max_diff(batch[i:i + 1], solo) <= IMAGES_TOL
    expected = reference(prompt=prompts, generator=[_generator(s) for s in seeds],
                         output_type="np", **FAST).images
    assert _max_diff(expected, batch) <= IMAGES_TOL


def test_generator_list_must_match_the_batch(pipe):
    # a list of one is one generator (as in diffusers); any other length must match
    with pytest.raises(ValueError, match="got 3 generators for a batch of 2 images"):
        pipe(prompt=PROMPT, num_images_per_prompt=2, generator=[_generator()] * 3, **FAST)


def test_callback_sees_every_step_and_can_cancel(pipe):
    seen = []

    def record(step, timestep, block_state):
        seen.append((step, float(timestep), tuple(block_state.latents.shape)))

    pipe(prompt=PROMPT, callback_on_step_end=record, generator=_generator(),
         **{**FAST, "num_inference_steps": 3})
    assert [s for s, _, _ in seen] == [0, 1, 2]
    timesteps = [t for _, t, _ in seen]
    assert timesteps == sorted(timesteps, reverse=True)
    assert all(shape == (1, 4, 16) for _, _, shape in seen)  # (B, h*w, 4c) at 32x32

    steps = []

    def cancel_after_first(step, timestep, block_state):
        steps.append(step)
        return True

    with pytest.raises(GenerationCancelled, match="after step 1 of 3"):
        pipe(prompt=PROMPT, callback_on_step_end=cancel_after_first, generator=_generator(),
             **{**FAST, "num_inference_steps": 3})
    assert steps == [0]


def test_progress_bar_can_be_silenced(distilled_dir, capsys):
    pipe = _ours(distilled_dir)
    pipe.set_progress_bar_config()  # default: shown
    pipe(prompt=PROMPT, generator=_generator(), output_type="latent", **FAST)
    assert "2/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPT, generator=_generator(), output_type="latent", **FAST)
    assert capsys.readouterr().err == ""


# -- structure, workflows, loading --------------------------------------------------------------


def test_repr_shows_the_four_sub_blocks_in_order():
    text = repr(Flux2KleinAutoBlocks())
    found = re.findall(r"\[(\d)\] (\w+) \((\w+)\)", text)
    assert found == [
        ("0", "text_encoder", "Flux2KleinTextEncoderStep"),
        ("1", "vae_encoder", "Flux2KleinAutoVaeEncoderStep"),
        ("2", "denoise", "Flux2KleinAutoDenoiseStep"),
        ("3", "decode", "Flux2KleinDecodeStep"),
    ]
    assert "is_distilled (default: True)" in text


def test_workflows_list_the_blocks_that_run():
    blocks = Flux2KleinAutoBlocks()
    assert blocks.available_workflows == ["text2image", "image_conditioned"]
    assert list(blocks.get_workflow("text2image").sub_blocks) == [
        "text_encoder", "denoise.prepare_latents", "denoise.set_timesteps", "denoise.loop",
        "decode",
    ]
    assert list(blocks.get_workflow("image_conditioned").sub_blocks) == [
        "text_encoder", "vae_encoder.preprocess", "vae_encoder.encode",
        "denoise.prepare_image_latents", "denoise.prepare_latents", "denoise.set_timesteps",
        "denoise.loop", "decode",
    ]
    with pytest.raises(ValueError, match="available: text2image, image_conditioned"):
        blocks.get_workflow("inpaint")


def test_text2image_workflow_loads_only_what_it_uses(distilled_dir, monkeypatch):
    pipe = ModularPipeline.from_pretrained(str(distilled_dir))
    assert sorted(pipe.blocks.get_workflow("text2image").component_names) == [
        "scheduler", "text_encoder", "tokenizer", "transformer", "vae"
    ]
    # Only the text encoder and its tokenizer are needed to encode prompts.
    encoder_only = pipe.blocks.get_workflow("text2image").sub_blocks["text_encoder"]
    assert sorted(encoder_only.component_names) == ["text_encoder", "tokenizer"]

    pipe.load_components(workflow="text2image", dtype=torch.float32)
    assert pipe.null_component_names == []
    pipe.set_progress_bar_config(disable=True)

    def no_lazy_loading(name):
        raise AssertionError(f"{name} was loaded lazily")

    monkeypatch.setattr(pipe, "_load_missing", no_lazy_loading)
    image = pipe(prompt=PROMPT, generator=_generator(), **FAST).images[0]
    assert image.size == (32, 32)


def test_saved_pipeline_reloads_as_flux2_klein(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    reloaded = ModularPipeline.from_pretrained(str(tmp_path))
    assert isinstance(reloaded.blocks, Flux2KleinAutoBlocks)
    assert reloaded.config["is_distilled"] is True
    reloaded.load_components(dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    kwargs = {"prompt": PROMPT, "output_type": "np", **FAST}
    expected = pipe(**kwargs, generator=_generator()).images
    assert _max_diff(expected, reloaded(**kwargs, generator=_generator()).images) == 0


def test_bad_output_type_names_the_block_and_choices(pipe):
    with pytest.raises(ValueError, match=r"decode: output_type 'jpg' is not one of pil, np"):
        pipe(prompt=PROMPT, generator=_generator(), output_type="jpg", **FAST)
