"""The request and response bodies of the images API (OpenAI's, plus a few extensions).

These check what can be checked without knowing the model: types, required fields, global
bounds (`n` in 1..10, finite numbers, the size's spelling). What a model allows (its sizes,
steps, prompt length, schedulers, workflows) is checked by `service.validation`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 32_000
MAX_SEED = 2**63 - 1


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
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(None, ge=0, le=100,
                                           description="jpeg/webp quality, 0-100.")

    @field_validator("n", "num_inference_steps", "guidance_scale", "seed", "output_compression",
                     "strength", "partial_images", mode="before", check_fields=False)
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any) -> Any:
        # Lax parsing (needed for multipart, where every field is a string) would read
        # `true` as 1; a boolean where a number belongs is a client bug worth reporting.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
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


class ImageEditRequest(StreamingFields, ImageRequestFields):
    """`POST /v1/images/edits`: as multipart form (files) or JSON (base64 strings)."""

    image: str = Field(min_length=1, description="The image to edit (base64 or data URL "
                       "in JSON; a file in multipart).")
    mask: str | None = Field(None, description="Where to edit: transparent (or white) areas.")
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                   description="Extension: how much to change the image.")


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


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    size: str
    output_format: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "blockserve"
    family: str
    ready: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelDetail(ModelCard):
    workflows: list[str]
    schedulers: list[str]
    default_scheduler: str | None
    sizes: list[str]
    defaults: dict
    limits: dict
    blocks: dict | None = Field(None, description="The block tree (null until loaded).")
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
