"""Prompts as text-encoder blocks take them: one string or a list, negative prompts matched
to them, and embeddings repeated for several images per prompt.

Every family's text encoder uses these, so a bad prompt gets the same `InvalidInput` naming
the block and the input everywhere, and `num_images_per_prompt` orders images the same way
(prompt-major: the n images of prompt 0 come first, as in diffusers).

Tokenizing pads every prompt to the tokenizer's `model_max_length` (77 for CLIP) and warns
when a prompt was cut.

Not handled here: encoding (each family's `encoders`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from blocks.errors import InvalidInput

logger = logging.getLogger(__name__)


def prompt_list(prompt: Any, owner: str, name: str = "prompt") -> list[str]:
    """`prompt` as a non-empty list of strings; `InvalidInput` naming `owner` and `name`."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidInput(f"{owner}: {name} must be a string or a non-empty list of strings, "
                           f"got {type(prompt).__name__}", name)
    return prompts


def negative_prompt_list(negative_prompt: Any, num_prompts: int, owner: str) -> list[str]:
    """The negative prompts, one per prompt: "" by default; a string applies to every prompt."""
    if negative_prompt is None:
        return [""] * num_prompts
    if isinstance(negative_prompt, str):
        return [negative_prompt] * num_prompts
    negatives = prompt_list(negative_prompt, owner, "negative_prompt")
    if len(negatives) != num_prompts:
        raise InvalidInput(f"{owner}: got {len(negatives)} negative prompts for {num_prompts} "
                           "prompts; pass one string, or one per prompt", "negative_prompt")
    return negatives


def check_images_per_prompt(num_images_per_prompt: int, owner: str) -> int:
    if num_images_per_prompt < 1:
        raise InvalidInput(f"{owner}: num_images_per_prompt must be >= 1, got "
                           f"{num_images_per_prompt}", "num_images_per_prompt")
    return num_images_per_prompt


def check_clip_skip(clip_skip: int | None, num_layers: int, owner: str) -> None:
    """`clip_skip` (layers to skip from the end of a text encoder) must leave a layer."""
    if clip_skip is not None and not 0 <= clip_skip < num_layers:
        raise InvalidInput(f"{owner}: clip_skip must be in 0..{num_layers - 1}, got {clip_skip}",
                           "clip_skip")


def repeat_per_prompt(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """(P, ...) -> (P * n, ...), prompt-major: the n images of prompt 0 come first."""
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)


def tokenize_padded(tokenizer: Any, prompts: list[str], max_length: int | None = None) -> Any:
    """`prompts` padded (and truncated) to `max_length`, by default the tokenizer's
    `model_max_length`, as PyTorch tensors; a warning when a prompt was truncated."""
    max_length = max_length or tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > max_length:
        logger.warning("prompts were truncated to %d tokens", max_length)
    return tokens
