"""What a LoRA file's keys mean: which component, which module, which weight, which alpha.

Two families of key formats are read, for any model:

- **diffusers / peft**: `<component>.<module path>.lora_A.weight` / `.lora_B.weight` (also
  diffusers' older `.lora.down.weight` / `.lora.up.weight`), the component being `unet`,
  `transformer`, `text_encoder` or `text_encoder_2`; a file without a component prefix (or
  with peft's `base_model.model.` or ai-toolkit's `diffusion_model.`) is the denoiser's. The
  scaling `lora_alpha / r` comes from diffusers' metadata in the file header (`lora_alpha`,
  `alpha_pattern`, `use_rslora`), else from `.alpha` keys, else it is 1.
- **kohya / A1111**: `lora_unet_<module>` (the denoiser), `lora_te_` or `lora_te1_` (the text
  encoder), `lora_te2_` (the second text encoder), each with `.lora_down.weight`,
  `.lora_up.weight` and an optional `.alpha`; the module is the model's module path with
  dots written as underscores, or another name a family registers for its model class
  (`register_module_names`: FLUX.2's original BFL names, where one fused `qkv` LoRA covers
  three diffusers projections and is split by rows of its up weight).

The result per component is `{module path: ModuleLora}`. A key that fits no module is an
error naming it, never skipped: a silently half-applied adapter is worse than none.

Not handled here: files (`blocks.lora.files`), applying weights (`blocks.lora.layers`), LoRA
variants other than plain LoRA (DoRA, LoKr, LoHa: refused with a message naming them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blocks.lora.files import LoraFile, LoraFileError

DENOISER_NAMES = ("unet", "transformer")
COMPONENT_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "denoiser", "lora_te_": "text_encoder",
                  "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_DENOISER_ALIASES = ("base_model.model.", "diffusion_model.")
_PARTS = {  # key suffix -> which weight
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".alpha": "alpha",
}
_REFUSED = ("dora_scale", "lora_magnitude_vector", "lokr_", "hada_", ".lora_B.bias")

# A target of a module name: the module path and the rows of the up weight it takes (None:
# all). A family registers a function giving extra names for its model class.
ModuleTarget = tuple[str, slice | None]
ModuleNames = Callable[[nn.Module], dict[str, list[ModuleTarget]]]
_NAME_REGISTRY: list[tuple[type, ModuleNames]] = []


def register_module_names(model_class: type, names: ModuleNames) -> None:
    """Let LoRA files name `model_class`'s modules by other names (e.g. a model's original
    checkpoint names), as underscore-joined keys mapped to module paths and up-weight rows."""
    _NAME_REGISTRY.append((model_class, names))


def lora_target_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a LoRA may adapt: every `Linear` and `Conv2d`, by path."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}


def _underscore_names(model: nn.Module) -> dict[str, list[ModuleTarget]]:
    names = {path.replace(".", "_"): [(path, None)] for path in lora_target_modules(model)}
    for model_class, extra in _NAME_REGISTRY:
        if isinstance(model, model_class):
            names.update(extra(model))
    return names


@dataclass(frozen=True)
class ModuleLora:
    """One module's low-rank update: delta(x) = up(down(x)) * scaling."""

    down: torch.Tensor  # (r, in) or conv (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or conv (out, r, 1, 1)
    scaling: float  # alpha / r (alpha / sqrt(r) for rs-LoRA); 1 without an alpha

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class _Entry:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def _split_key(key: str) -> tuple[str, str] | None:
    """(name without the suffix, part) or None when the key is no LoRA weight."""
    for suffix, part in _PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    match = re.fullmatch(r"(.+)\.lora_([AB])\.[^.]+\.weight", key)  # peft's named adapters
    if match:
        return match.group(1), "down" if match.group(2) == "A" else "up"
    return None


def _component_of(name: str, components: Mapping[str, nn.Module]) -> tuple[str, str, bool]:
    """(component, module name, kohya-style) for a key's name."""
    denoiser = next((c for c in DENOISER_NAMES if c in components), None)
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return (denoiser if component == "denoiser" else component) or "", \
                name[len(prefix):], True
    for component in sorted(COMPONENT_PREFIXES, key=len, reverse=True):
        if name.startswith(component + "."):
            return component, name[len(component) + 1:], False
    for alias in _DENOISER_ALIASES:
        if name.startswith(alias):
            return denoiser or "", name[len(alias):], False
    return denoiser or "", name, False


def _old_diffusers_path(path: str) -> str:
    """diffusers' older attention-processor names for the same modules."""
    path = path.replace(".processor.", ".")
    for old, new in (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"),
                     ("to_out_lora", "to_out.0")):
        path = path.replace(old, new)
    return path


def parse_lora(file: LoraFile, components: Mapping[str, nn.Module], only_these: bool = False,
               ) -> dict[str, dict[str, ModuleLora]]:
    """`file`'s weights per component of `components` (name -> model) and module path.
    `only_these`: skip the weights of other components instead of refusing them (a process
    that holds some of a pipeline's models, e.g. a text-encoder replica, loads their part)."""
    refused = sorted({marker for key in file.tensors for marker in _REFUSED if marker in key})
    if refused:
        raise LoraFileError(
            f"{file.source}: only plain LoRA is supported; this file has {', '.join(refused)} "
            "weights (DoRA, LoKr or LoHa)"
        )
    entries: dict[tuple[str, str, bool], _Entry] = {}
    unknown = []
    for key, tensor in file.tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, part = split
        component, module, kohya = _component_of(name, components)
        if only_these and component not in components:
            continue
        entry = entries.setdefault((component, module, kohya), _Entry())
        if part == "alpha":
            entry.alpha = float(tensor.item())
        else:
            setattr(entry, part, tensor)
    if unknown:
        raise LoraFileError(
            f"{file.source}: {len(unknown)} key(s) are not LoRA weights, e.g. {unknown[:3]}; "
            "expected <module>.lora_A.weight/.lora_B.weight (diffusers, peft) or "
            "lora_unet_<module>.lora_down.weight/.lora_up.weight/.alpha (kohya)"
        )
    result: dict[str, dict[str, ModuleLora]] = {}
    names_cache: dict[str, dict[str, list[ModuleTarget]]] = {}
    unmatched = []
    for (component, module, kohya), entry in entries.items():
        model = components.get(component)
        if model is None:
            present = ", ".join(name for name in components) or "none"
            raise LoraFileError(
                f"{file.source}: weights for component {component or '(denoiser)'!r} "
                f"(e.g. {module!r}), which this pipeline does not have; its components: {present}"
            )
        if entry.down is None or entry.up is None:
            missing = "down (lora_A)" if entry.down is None else "up (lora_B)"
            raise LoraFileError(f"{file.source}: {component}.{module} has no {missing} weight")
        targets = _targets(model, component, module, kohya, names_cache)
        if targets is None:
            unmatched.append(f"{component}.{module}")
            continue
        config = _config_for(file.metadata, component)
        for path, rows in targets:
            up = entry.up if rows is None else entry.up[rows]
            alpha = entry.alpha if entry.alpha is not None else _alpha_from_config(config, path)
            rank = entry.down.shape[0]
            scaling = 1.0 if alpha is None else (
                alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)
            per_module = result.setdefault(component, {})
            if path in per_module:
                raise LoraFileError(f"{file.source}: {component}.{path} is adapted twice")
            per_module[path] = ModuleLora(entry.down, up, scaling)
    if unmatched:
        raise LoraFileError(
            f"{file.source}: {len(unmatched)} LoRA module(s) match no Linear or Conv2d module of "
            f"the model, e.g. {unmatched[:3]}"
        )
    return {component: _fit_shapes(file.source, component, components[component], modules)
            for component, modules in result.items()}


def _targets(model: nn.Module, component: str, module: str, kohya: bool,
             cache: dict[str, dict[str, list[ModuleTarget]]]) -> list[ModuleTarget] | None:
    """The module(s) a file's module name means. A name may carry leading wrapper segments
    the loaded model does not have (transformers 5 loads CLIP without its checkpoint's
    `text_model.` level): then the longest module name it ends with is the one."""
    if not kohya:
        paths = lora_target_modules(model)
        for candidate in (module, _old_diffusers_path(module)):
            if candidate in paths:
                return [(candidate, None)]
    if component not in cache:
        cache[component] = _underscore_names(model)
    names = cache[component]
    key = module.replace(".", "_")
    if key in names:
        return names[key]
    ends = [name for name in names if key.endswith("_" + name)]
    return names[max(ends, key=len)] if ends else None


def _config_for(metadata: dict[str, Any] | None, component: str) -> dict[str, Any]:
    if not metadata:
        return {}
    prefix = component + "."
    return {key[len(prefix):]: value for key, value in metadata.items() if key.startswith(prefix)}


def _alpha_from_config(config: dict[str, Any], path: str) -> float | None:
    """peft's rule: the `alpha_pattern` entry whose key matches the end of the module path,
    else `lora_alpha`; None when the metadata has neither (then alpha = rank, scaling 1)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    if not config:
        return None
    # Metadata without lora_alpha is a peft LoraConfig with its default alpha, 8.
    return float(config.get("lora_alpha", 8))


def _fit_shapes(source: str, component: str, model: nn.Module,
               modules: dict[str, ModuleLora]) -> dict[str, ModuleLora]:
    """Checks each LoRA against its module and gives its weights the module's kind of shape
    (a 1x1 convolution's LoRA may be stored as a linear one and the other way round)."""
    targets = lora_target_modules(model)
    fitted = {}
    for path, lora in modules.items():
        layer = targets[path]
        down, up = lora.down, lora.up
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise LoraFileError(f"{source}: {component}.{path} is a grouped convolution")
            want_in, want_out = layer.in_channels, layer.out_channels
            if down.dim() == 2 and layer.kernel_size == (1, 1):
                down = down[:, :, None, None]
            if up.dim() == 2:
                up = up[:, :, None, None]
        else:
            want_in, want_out = layer.in_features, layer.out_features
            if down.dim() == 4 and down.shape[-2:] == (1, 1):
                down = down[:, :, 0, 0]
            if up.dim() == 4 and up.shape[-2:] == (1, 1):
                up = up[:, :, 0, 0]
        kernel_ok = not isinstance(layer, nn.Conv2d) or (
            down.dim() == 4 and tuple(down.shape[-2:]) == tuple(layer.kernel_size)
            and up.dim() == 4 and up.shape[-2:] == (1, 1))
        if (not kernel_ok or down.shape[1] != want_in or up.shape[0] != want_out
                or up.shape[1] != down.shape[0] or (down.dim() == 2) != (up.dim() == 2)):
            raise LoraFileError(
                f"{source}: {component}.{path} is {type(layer).__name__} {want_in} -> "
                f"{want_out}, but its LoRA weights are down {tuple(lora.down.shape)}, up "
                f"{tuple(lora.up.shape)}"
            )
        fitted[path] = ModuleLora(down, up, lora.scaling)
    return fitted
