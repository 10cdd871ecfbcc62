"""The request and response bodies of the images API (OpenAI's, plus a few extensions).

These check what can be checked without knowing the model: types, required fields, global
bounds (`n` in 1..10, finite numbers, the size's spelling). What a model allows (its sizes,
steps, prompt length, schedulers, workflows) is checked by `service.validation`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.models_file import MAX_LORA_SCALE

MAX_PROMPT_CHARS = 32_000
MAX_SEED = 2**63 - 1
MAX_INPUT_IMAGES = 16  # OpenAI's bound on input images of one edit
MAX_LORAS = 8  # adapters one request may combine


class LoraRequest(BaseModel):
    """One LoRA adapter a request asks for: a name the model's `loras` list, and a scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="One of the model's adapters "
                      "(GET /v1/models/{id} lists them).")
    scale: float | None = Field(None, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE,
                                allow_inf_nan=False,
                                description="How strongly to apply it; default: the "
                                            "model's scale for it (usually 1).")


class ImageRequestFields(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="What to draw. Bounded per model by max_prompt_length.")
    model: str | None = Field(None, max_length=64,
                              description="A configured model; default: the first one.")
    n: int | None = Field(None, ge=1, le=10,
                          description="How many images (1-10, bounded per model by max_n).")
    size: str | None = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$",
                             description="WIDTHxHEIGHT, one of the model's sizes, or auto.")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default) or url (served from /v1/files/{id} for a while).")
    user: str | None = Field(None, max_length=256, description="An end-user id, for logs.")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                                        description="Extension: what to steer away from.")
    num_inference_steps: int | None = Field(None, ge=1, le=1000,
                                            description="Extension: denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                         description="Extension: classifier-free guidance.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 10,
                             description="Extension: image i uses seed + i; random if absent.")
    scheduler: str | None = Field(None, max_length=64,
                                  description="Extension: one of the model's schedulers.")
    step_cache: str | None = Field(
        None, max_length=64,
        description="Extension: 'off' or one of the model's step-cache methods (GET "
                    "/v1/models/{id} lists them), with its default parameters; absent: the "
                    "model's default.")
    loras: list[LoraRequest] | None = Field(
        None, max_length=MAX_LORAS,
        description="Extension: LoRA adapters to apply, by name (the model's `loras`), each "
                    "with an optional scale; several combine. In multipart bodies: a JSON "
                    "string.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(None, ge=0, le=100,
                                           description="jpeg/webp quality, 0-100.")
    # OpenAI's options that are not pipeline inputs (`service.openai_options` says what each
    # one does here). Values that mean "the default" are accepted silently; values no model
    # here can serve get a 400 naming the field.
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = (
        Field(None, description="Denoising steps, relative to the model's default: low = "
              "half, auto/medium/standard = the default, high/hd = twice, xhigh = three "
              "times, max = the model's max_steps (capped there). num_inference_steps wins."))
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto or opaque; these models draw opaque images (no alpha), so "
                          "transparent is refused with a 400.")
    moderation: Literal["auto", "low"] | None = Field(
        None, description="Accepted; blockserve runs no content filter of its own.")
    style: Literal["vivid", "natural"] | None = Field(
        None, description="DALL-E 3's style hint: accepted and ignored (put style in the "
                          "prompt).")
    safety_identifier: str | None = Field(None, max_length=256,
                                          description="An end-user id, for logs (wins over "
                                                      "user); echoed in the response.")
    complexity: str | None = Field(None, max_length=64, description="Not served: only null.")
    frame_count: int | None = Field(None, description="GIF output is not served: only null.")
    frame_duration_ms: int | None = Field(None, description="GIF output is not served: only "
                                                            "null.")
    svg: dict[str, Any] | None = Field(None, description="SVG output is not served: only null.")

    @field_validator("n", "num_inference_steps", "guidance_scale", "seed", "output_compression",
                     "strength", "partial_images", "frame_count", "frame_duration_ms",
                     mode="before", check_fields=False)
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any) -> Any:
        # Lax parsing (needed for multipart, where every field is a string) would read
        # `true` as 1; a boolean where a number belongs is a client bug worth reporting.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value: Any) -> Any:
        # Multipart forms carry every field as a string: there, `loras` is JSON.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                raise ValueError('must be a list like [{"name": "...", "scale": 0.8}] '
                                 "(JSON in a multipart form)") from None
        return value


def _no_numbers_for_booleans(value: Any) -> Any:
    # Lax parsing reads 0 and 1 as booleans; a number where a switch belongs is a client bug.
    # (Strings stay lax: multipart forms send "true".)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError("must be a boolean, not a number")
    return value


class StreamingFields(BaseModel):
    """OpenAI's streaming switch, for the routes that answer with server-sent events."""

    stream: bool | None = Field(None, description="Answer with server-sent events: "
                                "partial images while denoising, then the completed images.")
    partial_images: int | None = Field(None, ge=0, le=3, description="With stream: how many "
                                       "partial (preview) images to send per image, 0-3.")

    _switches = field_validator("stream", mode="before")(_no_numbers_for_booleans)


class ImageGenerationRequest(StreamingFields, ImageRequestFields):
    """`POST /v1/images/generations` (JSON)."""


class ImageReference(BaseModel):
    """An input image in a JSON body, as OpenAI's images API sends it: exactly one of a
    `data:image/...;base64,` URL or the id of a file this server made (`/v1/files/{id}`).
    Remote URLs are never fetched."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(None, description="A data:image/...;base64, URL.")
    file_id: str | None = Field(None, max_length=64,
                                description="An image this server returned as a url.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageReference:
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("give exactly one of image_url (a data: URL) or file_id")
        return self


class ImageInputFields(BaseModel):
    """What requests with an input image add: how much of it to change."""

    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                   description="Extension: how much to change the image.")


class ImageEditRequest(StreamingFields, ImageInputFields, ImageRequestFields):
    """`POST /v1/images/edits`: as multipart form (files) or JSON (base64 strings or OpenAI's
    `images: [{image_url | file_id}]`)."""

    image: str | None = Field(None, min_length=1, description="The image to edit (base64 or "
                              "data URL in JSON; a file in multipart, `image[]` for several).")
    images: list[ImageReference] | None = Field(
        None, min_length=1, max_length=MAX_INPUT_IMAGES,
        description="OpenAI's JSON form: input images (several only where the model takes "
                    "reference images).")
    mask: str | ImageReference | None = Field(
        None, description="Where to edit: transparent (or white) areas.")
    input_fidelity: Literal["high", "low"] | None = Field(
        None, description="Accepted; these pipelines keep the input as `strength` says.")
    markup: str | None = Field(None, description="Not served: only null.")


class ImageVariationRequest(ImageInputFields, ImageRequestFields):
    """`POST /v1/images/variations` (multipart): the image, redrawn by an image-to-image or
    image-conditioned workflow. OpenAI's fields, plus the extensions; no prompt needed."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                        description="Extension: steer the variation (default: none).")
    image: str = Field(min_length=1, description="The image (a file).")


class JobRequest(ImageRequestFields):
    """`POST /v1/jobs`: a generation's body, run in the background."""

    preview: bool | None = Field(None, description="Send a low-resolution preview image "
                                 "(base64 PNG, from the latents) with every progress event.")

    _switches = field_validator("preview", mode="before")(_no_numbers_for_booleans)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="The seed that reproduces this image (with n=1).")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    """OpenAI's usage block. Prompt tokens are counted with the model's own tokenizer; an
    input or output image counts as one image token."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    size: str
    output_format: str
    quality: str
    background: str
    usage: Usage
    safety_identifier: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "blockserve"
    family: str
    ready: bool
    aliases: list[str] = Field(default_factory=list,
                               description="Other names requests may use for this model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraInfo(BaseModel):
    name: str
    scale: float = Field(description="The scale of a request that gives none.")
    loaded: bool = Field(description="Loaded now (else loaded on first use).")


class ModelDetail(ModelCard):
    workflows: list[str]
    schedulers: list[str]
    default_scheduler: str | None
    sizes: list[str]
    defaults: dict
    limits: dict
    blocks: dict | None = Field(None, description="The block tree (null until loaded).")
    step_cache: dict = Field(
        default_factory=dict,
        description="Step caching: `methods` a request's step_cache may name (besides "
                    "'off') and the model's `default` ('off' or a method and parameters).")
    loras: list[LoraInfo] = Field(default_factory=list,
                                  description="LoRA adapters requests may name (`loras`).")
    max_loaded_loras: int = Field(description="Adapters kept loaded at once (LRU).")
    placement: dict | None = Field(
        None, description="Ray mode: the deployment and replica count running each heavy "
                          "block; absent in embedded mode.")


class JobError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class JobStatus(BaseModel):
    """A background job (`/v1/jobs`): where it is, and its result or error once finished."""

    id: str
    object: Literal["image.job"] = "image.job"
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: int
    position: int | None = Field(None, description="While queued: jobs ahead of it.")
    step: int = Field(description="Denoising steps done.")
    total_steps: int
    eta_seconds: float | None = Field(None, description="While running: seconds left at the "
                                      "pace so far.")
    result: ImagesResponse | None = Field(None, description="Once succeeded.")
    error: JobError | None = Field(None, description="Once failed or cancelled.")
