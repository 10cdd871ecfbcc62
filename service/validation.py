"""Checking a request against the model it names, and turning it into a `GenerationJob`.

The request bodies (`service.schemas`) are already well-formed; here every value is checked
against what the chosen model allows (models file limits, allowed sizes and size factor, the
inputs its blocks accept, its workflows and schedulers). Each failure is an `APIError` whose
message names the field and lists the allowed values or range.
"""

from __future__ import annotations

import secrets

from PIL import Image

from blocks.step_cache import InvalidStepCache, step_cache_config
from service.errors import APIError
from service.image_io import as_rgb, mask_for_pipeline, resize_to
from service.jobs import GenerationJob
from service.models_file import ModelConfig, parse_size
from service.openai_options import check_options, steps_for
from service.registry import FAILED, LoadedModel, ModelNotReady, ModelRegistry
from service.schemas import (
    MAX_INPUT_IMAGES,
    ImageInputFields,
    ImageRequestFields,
    ImageVariationRequest,
)

EDIT_WORKFLOWS = ("image2image", "image_conditioned")  # without a mask, in preference order
MASK_WORKFLOWS = ("inpaint",)
# Workflows whose `image` input is a list of reference images; the others edit one image.
MULTI_IMAGE_WORKFLOWS = ("image_conditioned",)


def resolve_model(registry: ModelRegistry, name: str | None) -> str:
    """The configured model a request names, directly or by an alias (default: the first);
    404 names the others."""
    if name is None:
        return registry.default_model
    resolved = registry.models.resolve(name)
    if resolved is None:
        raise APIError(404, f"model '{name}' is not served here; available: "
                       f"{', '.join(registry.models.names_and_aliases())}", "model",
                       "model_not_found")
    return resolved


def ready_model(registry: ModelRegistry, name: str) -> LoadedModel:
    """The loaded model, or 503 (with Retry-After while it loads)."""
    try:
        return registry.get(name)
    except ModelNotReady as error:
        if error.state == FAILED:
            raise APIError(503, f"model '{name}' failed to load; see the server log",
                           "model", "model_unavailable") from None
        raise APIError(503, f"model '{name}' is still loading; retry shortly", "model",
                       "model_loading", {"Retry-After": "5"}) from None


def _unsupported(model: LoadedModel, field: str, input_name: str) -> APIError:
    return APIError(400, f"model '{model.name}' does not accept '{field}' (its pipeline has no "
                    f"'{input_name}' input)", field, "unsupported_parameter")


def requested_size(size: str | None, config: ModelConfig) -> tuple[int, int] | None:
    """(width, height) of an explicit `size`, checked against the model's allowed sizes
    before anything is loaded; None for `auto` or no size."""
    if size in (None, "auto"):
        return None
    allowed = config.allowed_sizes
    width, height = parse_size(size)
    factor = config.size_factor
    if width % factor or height % factor:
        raise APIError(400, f"size '{size}': width and height must be multiples of "
                       f"{factor} for model '{config.name}'; allowed sizes: "
                       f"{', '.join(allowed)}", "size", "invalid_size")
    if size not in allowed:
        raise APIError(400, f"size '{size}' is not allowed for model '{config.name}'; "
                       f"allowed sizes: {', '.join(allowed)}", "size", "invalid_size")
    return width, height


def _size(request: ImageRequestFields, model: LoadedModel,
          image: Image.Image | None) -> tuple[int, int]:
    config = model.config
    explicit = requested_size(request.size, config)
    if explicit is not None:
        return explicit
    if image is not None and f"{image.width}x{image.height}" in config.allowed_sizes:
        return image.width, image.height
    return parse_size(config.defaults.size)


def _prompt(request: ImageRequestFields, model: LoadedModel) -> str:
    prompt = request.prompt
    # A variation needs no prompt: the image says what to draw.
    if not prompt.strip() and not isinstance(request, ImageVariationRequest):
        raise APIError(400, "'prompt' must not be empty or only whitespace", "prompt",
                       "invalid_value")
    limit = model.config.limits.max_prompt_length
    if len(prompt) > limit:
        raise APIError(400, f"'prompt' is {len(prompt)} characters; model '{model.name}' "
                       f"accepts at most {limit}", "prompt", "prompt_too_long")
    negative = request.negative_prompt
    if negative is not None and len(negative) > limit:
        raise APIError(400, f"'negative_prompt' is {len(negative)} characters; model "
                       f"'{model.name}' accepts at most {limit}", "negative_prompt",
                       "prompt_too_long")
    return prompt


def input_images(images: list[Image.Image], model: LoadedModel, workflow: str,
                 field: str = "image") -> Image.Image | list[Image.Image]:
    """The job's `image`: one image, or a list where the workflow takes reference images;
    400 naming the limit otherwise."""
    if len(images) == 1:
        return images[0]
    if workflow not in MULTI_IMAGE_WORKFLOWS:
        raise APIError(400, f"model '{model.name}' takes one input image for {workflow}; got "
                       f"{len(images)} (several reference images need a workflow of: "
                       f"{', '.join(MULTI_IMAGE_WORKFLOWS)})", field, "too_many_images")
    if len(images) > MAX_INPUT_IMAGES:
        raise APIError(400, f"at most {MAX_INPUT_IMAGES} input images; got {len(images)}",
                       field, "too_many_images")
    return images


def requested_loras(request: ImageRequestFields, model: LoadedModel,
                    ) -> tuple[tuple[str, float], ...]:
    """The request's adapters as (name, scale) pairs, checked against the model's `loras`
    (an unknown name is a 400 listing the allowed ones; a request never names a file)."""
    if not request.loras:
        return ()
    allowed = model.config.loras
    chosen: dict[str, float] = {}
    for index, lora in enumerate(request.loras):
        param = f"loras[{index}].name"
        if lora.name not in allowed:
            names = ", ".join(allowed) or "none (this model has no adapters)"
            raise APIError(400, f"lora '{lora.name}' is not available for model "
                           f"'{model.name}'; available: {names}", param, "invalid_value")
        if lora.name in chosen:
            raise APIError(400, f"lora '{lora.name}' is given twice", param, "invalid_value")
        chosen[lora.name] = lora.scale if lora.scale is not None else allowed[lora.name].scale
    limit = model.config.max_loaded_loras
    if len(chosen) > limit:
        raise APIError(400, f"{len(chosen)} loras requested; model '{model.name}' keeps at most "
                       f"{limit} loaded", "loras", "invalid_value")
    return tuple(chosen.items())


def build_job(
    request: ImageRequestFields,
    model: LoadedModel,
    workflow: str = "text2image",
    image: Image.Image | list[Image.Image] | None = None,
    mask: Image.Image | None = None,
) -> GenerationJob:
    """A job for `request` on `model`, or an `APIError` naming the first bad field."""
    config, limits = model.config, model.config.limits
    if workflow not in model.workflows:
        raise APIError(400, f"model '{model.name}' has no {workflow} workflow; available: "
                       f"{', '.join(model.workflows)}", None, "unsupported_workflow")
    check_options(request, model.name)
    prompt = _prompt(request, model)
    n = request.n or 1
    if n > limits.max_n:
        raise APIError(400, f"'n' is {n}; model '{model.name}' allows 1 to {limits.max_n}",
                       "n", "invalid_value")
    if n > 1 and not model.accepts("num_images_per_prompt"):
        raise _unsupported(model, "n", "num_images_per_prompt")
    steps = steps_for(request, config)
    if steps > limits.max_steps:
        raise APIError(400, f"'num_inference_steps' is {steps}; model '{model.name}' allows "
                       f"1 to {limits.max_steps}", "num_inference_steps", "invalid_value")
    guidance = request.guidance_scale
    if guidance is not None:
        if not model.accepts("guidance_scale"):
            raise _unsupported(model, "guidance_scale", "guidance_scale")
        if guidance > limits.max_guidance_scale:
            raise APIError(400, f"'guidance_scale' is {guidance}; model '{model.name}' allows "
                           f"0 to {limits.max_guidance_scale}", "guidance_scale",
                           "invalid_value")
    elif model.accepts("guidance_scale"):
        guidance = config.defaults.guidance_scale
    if request.negative_prompt is not None and not model.accepts("negative_prompt"):
        raise _unsupported(model, "negative_prompt", "negative_prompt")
    scheduler = request.scheduler or config.defaults.scheduler
    if scheduler is not None and scheduler not in model.schedulers:
        raise APIError(400, f"scheduler '{scheduler}' is not available for model "
                       f"'{model.name}'; available: {', '.join(model.schedulers)}",
                       "scheduler", "invalid_value")
    strength = None
    with_image = isinstance(request, ImageInputFields)
    if with_image and workflow != "image_conditioned":
        strength = request.strength if request.strength is not None else config.defaults.strength
        if strength is not None and not model.accepts("strength"):
            raise _unsupported(model, "strength", "strength")
    elif with_image and request.strength is not None:
        raise APIError(400, f"'strength' does not apply to model '{model.name}''s "
                       f"{workflow} workflow", "strength", "unsupported_parameter")
    if strength is not None and steps * strength < 1:
        raise APIError(400, f"num_inference_steps ({steps}) x strength ({strength}) must be at "
                       "least 1, or no denoising step would run", "strength", "invalid_value")
    images = [] if image is None else image if isinstance(image, list) else [image]
    width, height = _size(request, model, images[0] if images else None)
    pipeline_image: Image.Image | list[Image.Image] | None = None
    pipeline_mask = None
    if images:
        if mask is not None:
            pipeline_mask = resize_to(mask_for_pipeline(mask, images[0].size), width, height,
                                      Image.NEAREST)
        rgb = [as_rgb(each) for each in images]
        if workflow != "image_conditioned":  # a reference image keeps its own size
            rgb = [resize_to(each, width, height, Image.LANCZOS) for each in rgb]
        pipeline_image = input_images(rgb, model, workflow)
    loras = requested_loras(request, model)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    step_cache = model.step_cache
    if request.step_cache is not None:
        try:
            step_cache = step_cache_config(request.step_cache, "step_cache",
                                           model.step_cache_methods)
        except InvalidStepCache as error:
            raise APIError(400, f"{error} (model '{model.name}')", "step_cache",
                           "invalid_value") from None
    return GenerationJob(
        model=model.name, workflow=workflow, prompt=prompt, n=n, width=width, height=height,
        steps=steps, seed=seed, negative_prompt=request.negative_prompt,
        guidance_scale=guidance, scheduler=scheduler if scheduler != model.default_scheduler
        else None, strength=strength, image=pipeline_image, mask=pipeline_mask,
        step_cache=step_cache, loras=loras,
    )


def edit_workflow(model: LoadedModel, has_mask: bool) -> str:
    """The workflow an edit runs: inpaint with a mask, else image-to-image or image-conditioned."""
    candidates = MASK_WORKFLOWS if has_mask else EDIT_WORKFLOWS
    for workflow in candidates:
        if workflow in model.workflows:
            return workflow
    what = "masked edits (inpaint)" if has_mask else "image edits (image2image, image_conditioned)"
    raise APIError(400, f"model '{model.name}' does not support {what}; its workflows: "
                   f"{', '.join(model.workflows)}", "mask" if has_mask else "image",
                   "unsupported_workflow")
