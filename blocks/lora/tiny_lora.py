"""Deterministic random-weight LoRA files for any model, in diffusers/peft or kohya layout.

Tests and benchmarks need adapters without a hub: `random_lora` draws, from a seed, a
rank-`rank` LoRA for the chosen modules of each given model (both projections non-zero, so
every adapted module changes the output) and returns its tensors and header metadata in the
requested layout; `write_lora_file` writes them as diffusers would.

- `"peft"`: `<component>.<module>.lora_A.weight` / `.lora_B.weight`, with `lora_alpha` and
  `target_modules` per component in diffusers' header metadata;
- `"kohya"`: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` /
  `.alpha` (`lora_te_`, `lora_te2_` for the text encoders), no metadata.

Not handled here: names other than a model's own module paths (a family's checkpoint names are
tested where the family lives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from blocks.lora.keys import lora_target_modules

KOHYA_PREFIX = {"unet": "lora_unet_", "transformer": "lora_unet_",
                "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# Attention and feed-forward projections: what LoRA trainers target by default.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def attention_modules(path: str, module: nn.Module) -> bool:
    return path.endswith(DEFAULT_TARGETS)


def random_lora(
    models: Mapping[str, nn.Module],
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    layout: Literal["peft", "kohya"] = "peft",
    targets: Callable[[str, nn.Module], bool] = attention_modules,
    std: float = 0.1,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors, metadata) of a random LoRA for `models` (component name -> model) on the
    modules `targets(path, module)` picks; `alpha` None means alpha = rank (scaling 1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for component, model in models.items():
        chosen = [(path, module) for path, module in lora_target_modules(model).items()
                  if targets(path, module)]
        for path, module in chosen:
            if isinstance(module, nn.Conv2d):
                down_shape = (rank, module.in_channels, *module.kernel_size)
                up_shape = (module.out_channels, rank, 1, 1)
            else:
                down_shape = (rank, module.in_features)
                up_shape = (module.out_features, rank)
            down = torch.randn(down_shape, generator=generator) * std
            up = torch.randn(up_shape, generator=generator) * std
            if layout == "peft":
                tensors[f"{component}.{path}.lora_A.weight"] = down
                tensors[f"{component}.{path}.lora_B.weight"] = up
            else:
                name = KOHYA_PREFIX[component] + path.replace(".", "_")
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(alpha if alpha else rank))
        if layout == "peft" and chosen:
            metadata.update({f"{component}.r": rank,
                             f"{component}.lora_alpha": alpha if alpha else rank,
                             f"{component}.target_modules": sorted(p for p, _ in chosen)})
    return tensors, (metadata or None)
