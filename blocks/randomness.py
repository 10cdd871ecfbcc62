"""Drawing noise the way diffusers does, so a seed means the same image in both.

Noise is drawn on the generator's device (a CPU generator draws on the CPU, whatever the
target device) and then moved. A list of generators draws image i from generator i alone, so
an image is identical whether it is made alone or in a batch; a list of one is one generator.
"""

from __future__ import annotations

import torch

from blocks.errors import InvalidInput

Generator = torch.Generator | list[torch.Generator] | None


def randn(
    shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, as diffusers' `randn_tensor` draws it."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise InvalidInput(f"got {len(generator)} generators for a batch of {shape[0]} "
                               "images; pass one generator, or one per image", "generator")
        one = (1, *shape[1:])
        return torch.cat([
            torch.randn(one, generator=g, device=g.device, dtype=dtype) for g in generator
        ]).to(device)
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
