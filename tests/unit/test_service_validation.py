"""Request validation without a server: schemas, checks against a model, images and masks."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from service.engine import run_job
from service.errors import APIError, validation_error
from service.image_io import decode_base64_image, decode_image, mask_for_pipeline
from service.models_file import parse_models
from service.registry import LoadedModel, ModelRegistry
from service.schemas import ImageEditRequest, ImageGenerationRequest
from service.validation import build_job, edit_workflow, resolve_model

MODELS = {
    "models": {
        "demo": {"family": "demo", "defaults": {"steps": 3, "size": "32x32"},
                 "sizes": ["32x32", "64x64"],
                 "limits": {"max_steps": 8, "max_n": 3, "max_prompt_length": 50}},
        "other": {"family": "demo"},
    }
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> ModelRegistry:
    return ModelRegistry(parse_models(MODELS, tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def demo(registry: ModelRegistry) -> LoadedModel:
    return registry.load("demo")


@pytest.fixture
def inpainter(demo: LoadedModel) -> LoadedModel:
    """The demo model as if its blocks also had an inpaint workflow and SD's inputs."""
    return dataclasses.replace(
        demo, workflows=(*demo.workflows, "inpaint"),
        input_names=demo.input_names | {"mask_image", "guidance_scale", "negative_prompt"},
    )


def gen(**fields) -> ImageGenerationRequest:
    return ImageGenerationRequest(prompt=fields.pop("prompt", "a red circle"), **fields)


def edit(**fields) -> ImageEditRequest:
    return ImageEditRequest(prompt="blue", image="(file)", **fields)


def image(size=(32, 32), mode="RGB", colour="red") -> Image.Image:
    return Image.new(mode, size, colour)


def error_of(call, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_defaults_fill_the_job(demo):
    job = build_job(gen(), demo)
    assert (job.model, job.workflow, job.width, job.height, job.steps, job.n) == (
        "demo", "text2image", 32, 32, 3, 1)
    assert 0 <= job.seed < 2**32
    assert job.guidance_scale is None  # the demo has no guidance input


def test_seeds_are_consecutive(demo):
    job = build_job(gen(n=3, seed=10), demo)
    assert job.seeds == [10, 11, 12]


def test_a_job_runs_and_makes_the_asked_images(registry, demo):
    job = build_job(gen(n=2, seed=1, size="64x64"), demo)
    result = run_job(registry, job)
    assert [im.size for im in result.images] == [(64, 64)] * 2
    assert result.seeds == [1, 2]


def test_resolve_model(registry):
    assert resolve_model(registry, None) == "demo"
    assert resolve_model(registry, "other") == "other"
    error = error_of(resolve_model, registry, "../etc")
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert "demo, other" in error.message


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"size": "70x64"}, "size", "multiples of 8"),
        ({"size": "128x128"}, "size", "allowed sizes: 32x32, 64x64"),
        ({"n": 4}, "n", "allows 1 to 3"),
        ({"num_inference_steps": 9}, "num_inference_steps", "allows 1 to 8"),
        ({"guidance_scale": 2.0}, "guidance_scale", "does not accept"),
        ({"negative_prompt": "blur"}, "negative_prompt", "does not accept"),
        ({"scheduler": "ddim"}, "scheduler", "available: flow_match_euler"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 51}, "prompt", "at most 50"),
    ],
)
def test_checks_against_the_model(demo, fields, param, fragment):
    error = error_of(build_job, gen(**fields), demo)
    assert error.status == 400
    assert error.param == param
    assert fragment in error.message


def test_guidance_bounds_and_negative_prompt_length(inpainter):
    error = error_of(build_job, gen(guidance_scale=25.0), inpainter)
    assert error.param == "guidance_scale" and "0 to 20" in error.message
    error = error_of(build_job, gen(negative_prompt="y" * 51), inpainter)
    assert error.param == "negative_prompt"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 0}, "n"), ({"n": 11}, "n"), ({"n": True}, "n"), ({"n": "two"}, "n"),
        ({"size": "huge"}, "size"), ({"seed": -1}, "seed"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"response_format": "gif"}, "response_format"),
        ({"output_format": "bmp"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"prompt": ""}, "prompt"), ({"quality": "ultra"}, "quality"),
            ({"background": "green"}, "background"), ({"frame_count": True}, "frame_count"),
    ],
)
def test_schema_errors_name_the_field(fields, param):
    with pytest.raises(ValidationError) as caught:
        gen(**fields)
    error = validation_error(caught.value, ImageGenerationRequest)
    assert (error.status, error.param) == (400, param)
    assert param in error.message


def test_unknown_fields_list_the_accepted_ones():
    with pytest.raises(ValidationError) as caught:
        gen(colour="vivid")
    error = validation_error(caught.value, ImageGenerationRequest)
    assert error.code == "unknown_parameter"
    assert "negative_prompt" in error.message and "seed" in error.message


def test_form_strings_are_coerced():
    request = edit(n="2", strength="0.5", seed="7")
    assert (request.n, request.strength, request.seed) == (2, 0.5, 7)
    with pytest.raises(ValidationError):
        edit(strength="nan")


def test_edit_workflows(demo, inpainter):
    assert edit_workflow(demo, has_mask=False) == "image2image"
    error = error_of(edit_workflow, demo, has_mask=True)
    assert (error.param, error.code) == ("mask", "unsupported_workflow")
    assert "text2image, image2image" in error.message
    assert edit_workflow(inpainter, has_mask=True) == "inpaint"


def test_edit_image_is_resized_and_size_defaults_to_the_image(registry, demo):
    job = build_job(edit(seed=1), demo, "image2image", image((64, 64), "RGBA"))
    assert (job.width, job.height) == (64, 64)
    assert job.image.size == (64, 64) and job.image.mode == "RGB"
    job = build_job(edit(seed=1), demo, "image2image", image((48, 40)))
    assert (job.width, job.height) == (32, 32)  # not an allowed size: the default
    assert job.image.size == (32, 32)
    assert run_job(registry, job).images[0].size == (32, 32)


def test_strength_times_steps_must_leave_a_step(demo):
    error = error_of(build_job, edit(strength=0.1, num_inference_steps=3), demo, "image2image",
                     image())
    assert error.param == "strength"


def test_inpaint_mask_is_checked_and_converted(inpainter):
    transparent_centre = image((32, 32), "RGBA", (0, 0, 0, 255))
    transparent_centre.paste((0, 0, 0, 0), (8, 8, 24, 24))
    job = build_job(edit(), inpainter, "inpaint", image(), transparent_centre)
    assert job.mask.mode == "L"
    assert job.mask.getpixel((16, 16)) == 255 and job.mask.getpixel((0, 0)) == 0
    error = error_of(build_job, edit(), inpainter, "inpaint", image(), image((16, 16), "L"))
    assert (error.param, error.code) == ("mask", "mask_size_mismatch")
    assert "16x16" in error.message and "32x32" in error.message


def test_grayscale_masks_mean_white_is_repainted():
    mask = mask_for_pipeline(image((8, 8), "L", 255), (8, 8))
    assert mask.getpixel((0, 0)) == 255


def test_workflow_the_model_lacks(demo):
    error = error_of(build_job, edit(), demo, "inpaint", image(), image())
    assert error.code == "unsupported_workflow"


def png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    image(size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_decoding_errors():
    assert decode_image(png(), "image").size == (8, 8)
    for data, code in ((b"", "invalid_image"), (b"GIF89a-not-really", "invalid_image"),
                       (png()[:30], "invalid_image")):
        error = error_of(decode_image, data, "image")
        assert (error.status, error.param, error.code) == (400, "image", code)
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert decode_base64_image(data_url, "mask").size == (8, 8)
    error = error_of(decode_base64_image, "not base64!", "mask")
    assert (error.param, error.code) == ("mask", "invalid_base64")
