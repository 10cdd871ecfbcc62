"""Prompts as text-encoder blocks take them: one string or a list, negative prompts matched
to them, and embeddings repeated for several images per prompt.

Every family's text encoder uses these, so a bad prompt gets the same `InvalidInput` naming
the block and the input everywhere, and `num_images_per_prompt` orders images the same way
(prompt-major: the n images of prompt 0 come first, as in diffusers).

Not handled here: tokenizing and encoding (each family's `encoders`).
"""

from __future__ import annotations

from typing import Any

import torch

from blocks.errors import InvalidInput


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


def repeat_per_prompt(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """(P, ...) -> (P * n, ...), prompt-major: the n images of prompt 0 come first."""
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)
