"""What blockserve does with OpenAI's image options that are not pipeline inputs.

OpenAI's images API has grown options for its own models; clients (the SDK, litellm) send
them, often at their "default" values. Each one gets a definite meaning here:

    quality            steps relative to the model's default: low = half, auto / medium /
                       standard = the default, high / hd = twice, xhigh = three times, max =
                       max_steps (every one capped at max_steps); an explicit
                       num_inference_steps wins. The response reports the level used.
    background         auto and opaque are what these models draw; transparent needs an alpha
                       channel no model here makes: 400 naming the field.
    moderation         auto or low: accepted; blockserve runs no content filter of its own.
    style              vivid or natural (DALL-E 3): accepted and ignored.
    input_fidelity     high or low: accepted; `strength` says how much of the input is kept.
    user, safety_identifier    logged with the request; safety_identifier is echoed back.
    complexity, svg, frame_count, frame_duration_ms, markup    options of OpenAI's SVG/GIF
                       outputs and markup edits, which are not served: null only, else a 400.

`usage` is OpenAI's token accounting: prompt tokens counted with the model's own tokenizer
(words where it has none), one image token per input or output image.

Not handled here: the pipeline inputs (`service.validation`), encoding (`service.image_io`).
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from typing import Any

from service.errors import APIError
from service.models_file import ModelConfig
from service.schemas import ImageRequestFields

# quality -> (response label, steps as a multiple of the default; None: max_steps)
QUALITY_LEVELS: dict[str, tuple[str, float | None]] = {
    "low": ("low", 0.5),
    "auto": ("medium", 1.0),
    "medium": ("medium", 1.0),
    "standard": ("medium", 1.0),
    "high": ("high", 2.0),
    "hd": ("high", 2.0),
    "xhigh": ("xhigh", 3.0),
    "max": ("max", None),
}
NOT_SERVED = {
    "complexity": "SVG output's complexity",
    "svg": "SVG output",
    "frame_count": "GIF output",
    "frame_duration_ms": "GIF output",
    "markup": "markup edits",
}


def quality_label(quality: str | None) -> str:
    """The `quality` a response reports for the requested one."""
    return QUALITY_LEVELS[quality or "auto"][0]


def steps_for(request: ImageRequestFields, config: ModelConfig) -> int:
    """Denoising steps: num_inference_steps when given, else the quality's share of the
    model's default (at least 1, at most max_steps)."""
    if request.num_inference_steps is not None:
        return request.num_inference_steps
    default, limit = config.defaults.steps, config.limits.max_steps
    factor = QUALITY_LEVELS[request.quality or "auto"][1]
    if factor is None:
        return limit
    return max(1, min(limit, math.ceil(default * factor)))


def check_options(request: ImageRequestFields, model_name: str) -> None:
    """400 naming the field for an option value no model here can serve."""
    for field, what in NOT_SERVED.items():
        if getattr(request, field, None) is not None:
            raise APIError(400, f"'{field}' is not supported: blockserve does not serve {what} "
                           f"(send null or leave it out)", field, "unsupported_parameter")
    if request.background == "transparent":
        raise APIError(400, f"background 'transparent' is not available: model '{model_name}' "
                       "draws opaque images (no alpha channel); send 'opaque' or 'auto'",
                       "background", "unsupported_value")


def end_user(request: ImageRequestFields) -> str | None:
    """Who the request is for, as OpenAI reads it: a non-empty safety_identifier, else user."""
    return request.safety_identifier or request.user or None


class _TokenCounter:
    """A private copy of a tokenizer: fast tokenizers must not be used by two threads at once,
    and the engine's workers use the model's own."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        with self._lock:
            return len(self._tokenizer(text, truncation=False)["input_ids"])


_counters: weakref.WeakKeyDictionary[Any, _TokenCounter] = weakref.WeakKeyDictionary()
_counters_lock = threading.Lock()


def prompt_tokens(pipeline: Any, prompt: str) -> int:
    """Tokens of `prompt` with `pipeline`'s tokenizer (words when it has none)."""
    with _counters_lock:
        counter = _counters.get(pipeline)
        if counter is None:
            components = getattr(pipeline, "components", {}) or {}
            counter = _counters[pipeline] = _TokenCounter(components.get("tokenizer"))
    return counter.count(prompt)


def usage(text_tokens: int, input_images: int, output_images: int) -> dict[str, Any]:
    return {
        "input_tokens": text_tokens + input_images,
        "output_tokens": output_images,
        "total_tokens": text_tokens + input_images + output_images,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": input_images},
    }
