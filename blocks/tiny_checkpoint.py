"""Helpers shared by the families' tiny-model factories.

Tiny checkpoints are real model classes at toy sizes with random weights, written in the
standard Hugging Face layout so that blockserve and diffusers load the very same files. Two
things make them useful as test fixtures, and both live here:

- every tensor that default initialisation leaves constant (norm scales, biases, ...) is
  re-drawn, so a block that drops a norm or a bias changes the output instead of hiding;
- everything is seeded, so the same call twice writes byte-identical files.

The same factories also write each family's real architecture (``size="real"``: the published
widths and depths, random weights, the same toy tokenizer) so that speed and memory can be
measured on a GPU without downloading anything; `build_seeded` and `SIZES` serve both sizes.

It deliberately knows nothing about any one family.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import TypeVar

import torch

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

# "tiny": toy widths, float32, for tests on a CPU. "real": the family's published architecture
# (random weights) for GPU checks; its checkpoints are written in bfloat16 by default.
SIZES: tuple[str, ...] = ("tiny", "real")

# A fixed corpus for training the tiny BPE tokenizers offline: enough words that prompts used
# in tests and docs tokenize into several distinct tokens.
TINY_CORPUS: tuple[str, ...] = (
    "a serene landscape at sunset with mountains and a lake",
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a purple triangle on a white background",
    "an orange star on a black background",
    "a photo of a cat sitting on a wooden table",
    "a painting of a dog running in a field of flowers",
    "an astronaut riding a horse on the moon, high quality, detailed",
    "a futuristic city at night with neon lights and rain",
    "portrait of a woman, oil painting, soft light",
    "low quality, blurry, bad anatomy, watermark, text",
    "the quick brown fox jumps over the lazy dog",
    "0 1 2 3 4 5 6 7 8 9 small large big tiny pink brown gray cyan",
)


@torch.no_grad()
def reseed_constant_tensors(module: torch.nn.Module, seed: int) -> int:
    """Re-draw every floating-point parameter or buffer whose elements are all equal.

    Ones become ``1 + 0.1 * noise`` (kept >= 0.5 so variances and scales stay positive),
    anything else becomes ``value + 0.02 * noise``. Tensors are visited in name order with
    their own generator, so the result depends only on ``seed`` and the module's structure.
    Meta tensors hold no values and are skipped. Returns how many tensors were changed.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    changed = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta:
            continue
        first = tensor.flatten()[0]
        if not bool((tensor == first).all()):
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        if float(first) == 1.0:
            value = (1.0 + 0.1 * noise).clamp_min(0.5)
        else:
            value = float(first) + 0.02 * noise
        tensor.copy_(value.to(tensor.dtype))
        changed += 1
    return changed


def check_size(size: str) -> None:
    """ValueError naming the allowed sizes when `size` is not one of `SIZES`."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")


def default_weight_dtype(size: str) -> torch.dtype:
    """How a checkpoint of `size` is saved unless told: tiny ones in float32 (bit-exact tests),
    real ones in bfloat16 (half the bytes; FLUX.2 [klein] is published in bfloat16)."""
    check_size(size)
    return torch.float32 if size == "tiny" else torch.bfloat16


def build_seeded(
    seed: int, build: Callable[[], ModuleT], device: str | torch.device = "cpu"
) -> ModuleT:
    """`build()` under `torch.manual_seed(seed)` with its tensors created on `device`, constant
    tensors re-drawn (`reseed_constant_tensors`), in eval mode.

    Building a real-size model on a GPU takes seconds where a CPU takes minutes; the same seed
    on another device draws other weights, so a checkpoint's bytes depend on it too.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = build()
    reseed_constant_tensors(model, seed)
    return model.eval()


def write_json(
    path: pathlib.Path, data: object, *, indent: int | None = 2, sort_keys: bool = True
) -> None:
    """JSON as diffusers' and transformers' `save_pretrained` write it (sorted, indent 2)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
