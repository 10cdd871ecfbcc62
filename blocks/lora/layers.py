"""LoRA applied to a model's `Linear` and `Conv2d` modules: base output plus low-rank deltas.

An adapter never changes a base weight (unless fused, below) and no module is replaced: each
adapted module gets one forward hook that adds `up(down(x)) * scale * alpha/r` for the
adapters in use (`blocks.lora.selection`), so the model's class, parameters and state dict
stay what they were, and a model shared by several pipelines or engine workers is shared
with its adapters, as in diffusers.

**Per sample.** Under `adapters_per_sample`, each adapter's rows are gathered (`index_select`),
run through its down and up projections, scaled per row and added back to those rows
(`index_add`): a segmented low-rank matmul on the shared base output, with no weight merged
and no copy of a base weight. Adapters are visited in a fixed order (sorted names) and every
row's delta is computed on a contiguous copy of that row's input only, so under
`blocks.batch_invariance.batch_invariant()` a row gets the same bits whatever it shares its
batch with: its GEMMs have the same shapes alone and batched, and the adds are element-wise.

**Fused.** `fuse` adds an adapter's delta into the base weight (and keeps the unfused weight
tensor, so `unfuse` restores it exactly); while a module has fused adapters its hook adds
nothing, as peft's merged layers do. That is the merge-and-swap way of serving one adapter at
a time; per-sample deltas are the way to serve several at once.

Not handled here: reading files and key formats (`blocks.lora.keys`), which adapters are active
(the pipeline's `set_adapters`), devices other than the module's own (adapter weights follow
their module on first use after a move).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blocks.lora.keys import ModuleLora
from blocks.lora.selection import RowAdapters, current_call_adapters, current_rows

_ATTRIBUTE = "_blocks_loras"


class AdaptedModule:
    """The adapters of one `Linear` or `Conv2d` and its forward hook."""

    def __init__(self, owner: ModelLoras, path: str, module: nn.Module) -> None:
        self.owner = owner
        self.path = path
        self.module = module
        # Replaced, never mutated: a forward in another thread keeps the dict it started with.
        self.adapters: dict[str, ModuleLora] = {}
        self.fused: list[str] = []
        self.unfused_weight: torch.Tensor | None = None
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(f"LoRA on {path}: padding mode {module.padding_mode!r} "
                                 "is not supported (only 'zeros')")
            self.conv: tuple[Any, Any, Any] | None = (module.stride, module.padding,
                                                       module.dilation)
        else:
            self.conv = None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    # -- weights ---------------------------------------------------------------------------

    def _ready(self, name: str, lora: ModuleLora) -> ModuleLora:
        """`lora` on the module's device and dtype (converted once after the module moved)."""
        weight = self.module.weight
        if lora.down.device == weight.device and lora.down.dtype == weight.dtype:
            return lora
        moved = ModuleLora(lora.down.to(weight.device, weight.dtype),
                           lora.up.to(weight.device, weight.dtype), lora.scaling)
        self.adapters = {**self.adapters, name: moved}
        return moved

    def _down(self, lora: ModuleLora, x: torch.Tensor) -> torch.Tensor:
        """down(x): the rank-r intermediate, (N, ..., r) or (N, r, H, W)."""
        if self.conv is None:
            return F.linear(x, lora.down)
        stride, padding, dilation = self.conv
        return F.conv2d(x, lora.down, None, stride, padding, dilation)

    def _up(self, lora: ModuleLora, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, lora.up) if self.conv is None else F.conv2d(h, lora.up)

    def delta_weight(self, lora: ModuleLora) -> torch.Tensor:
        """The adapter's update of the base weight, unscaled: up @ down in the weight's shape."""
        weight = self.module.weight
        down, up = lora.down.to(weight.device, torch.float32), lora.up.to(weight.device,
                                                                             torch.float32)
        return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)

    # -- forward ---------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        adapters = self.adapters
        if not adapters or self.fused:
            return None
        x = args[0] if args else kwargs["input"]
        # In place where nothing records the graph (serving); out of place when training.
        in_place = not (torch.is_grad_enabled() and (output.requires_grad or x.requires_grad))
        rows = current_rows()
        if rows is not None:
            return self._per_sample(x, output, rows, adapters, in_place)
        chosen = current_call_adapters()
        if chosen is None:
            if not self.owner.enabled:
                return None
            chosen = self.owner.active
        out = output
        for name, scale in chosen.items():
            lora = adapters.get(name)
            if lora is None:
                continue
            lora = self._ready(name, lora)
            # The scale multiplies the rank-r intermediate: r values per row, not out_features.
            delta = self._up(lora, self._down(lora, x) * (lora.scaling * scale))
            out = out.add_(delta) if in_place else out + delta
        return out

    def _per_sample(self, x: torch.Tensor, output: torch.Tensor, rows: RowAdapters,
                    adapters: dict[str, ModuleLora], in_place: bool) -> torch.Tensor:
        if x.shape[0] != rows.rows:
            raise ValueError(
                f"LoRA on {self.owner.name}.{self.path}: a batch of {x.shape[0]} rows, but "
                f"adapters were given per sample for {rows.rows}"
            )
        out = output
        for name in rows.groups:
            lora = adapters.get(name)
            if lora is None:
                continue
            lora = self._ready(name, lora)
            index = rows.index(name, x.device)
            part = x if index is None else x.index_select(0, index)
            h = self._down(lora, part.contiguous())
            h = h * rows.scales(name, lora.scaling, h.dim(), h.dtype, h.device)
            delta = self._up(lora, h)
            if index is None:
                out = out.add_(delta) if in_place else out + delta
            else:
                out = out.index_add_(0, index, delta) if in_place else out.index_add(0, index,
                                                                                     delta)
        return out

    # -- fusing ----------------------------------------------------------------------------

    def fuse(self, weights: dict[str, float]) -> None:
        """Add `weights` (adapter -> scale) into the base weight, keeping the unfused one."""
        chosen = {name: scale for name, scale in weights.items() if name in self.adapters}
        if not chosen:
            return
        weight = self.module.weight
        base = weight.data if self.unfused_weight is None else self.unfused_weight
        total = base.to(torch.float32)
        for name in dict.fromkeys([*self.fused, *chosen]):
            scale = chosen.get(name, self.owner.fused_scales.get(name, 1.0))
            lora = self.adapters[name]
            total = total + self.delta_weight(lora) * (lora.scaling * scale)
        if not torch.isfinite(total).all() and self.owner.safe_fusing:
            raise ValueError(f"fuse_lora: fusing {list(chosen)} into {self.owner.name}."
                             f"{self.path} gives non-finite weights")
        if self.unfused_weight is None:
            self.unfused_weight = weight.data
        weight.data = total.to(weight.dtype)
        self.fused = [*self.fused, *[n for n in chosen if n not in self.fused]]

    def unfuse(self) -> None:
        if self.unfused_weight is not None:
            self.module.weight.data = self.unfused_weight
        self.unfused_weight = None
        self.fused = []

    def remove(self) -> None:
        self.handle.remove()


class ModelLoras:
    """The adapters loaded into one model (a UNet, transformer or text encoder): which modules
    each adapts, the active set for plain calls (`set_adapters`), enabled or not."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.name = name
        self.model = model
        self.modules: dict[str, AdaptedModule] = {}
        self.adapters: dict[str, list[str]] = {}  # adapter -> module paths
        self.active: dict[str, float] = {}
        self.enabled = True
        self.fused_scales: dict[str, float] = {}
        self.safe_fusing = False
        self._lock = threading.Lock()

    def add(self, adapter: str, modules: dict[str, ModuleLora]) -> None:
        """Load an adapter's weights (cast to each module's dtype and device)."""
        targets = dict(self.model.named_modules())
        with self._lock:
            if adapter in self.adapters:
                raise ValueError(f"adapter {adapter!r} is already loaded in {self.name}")
            for path, lora in modules.items():
                adapted = self.modules.get(path)
                if adapted is None:
                    adapted = self.modules[path] = AdaptedModule(self, path, targets[path])
                weight = targets[path].weight
                adapted.adapters = {**adapted.adapters, adapter: ModuleLora(
                    lora.down.to(weight.device, weight.dtype),
                    lora.up.to(weight.device, weight.dtype), lora.scaling)}
            self.adapters[adapter] = list(modules)

    def delete(self, adapter: str) -> None:
        with self._lock:
            for path in self.adapters.pop(adapter, []):
                adapted = self.modules[path]
                adapted.adapters = {k: v for k, v in adapted.adapters.items() if k != adapter}
                if not adapted.adapters:
                    adapted.remove()
                    del self.modules[path]
            self.active = {k: v for k, v in self.active.items() if k != adapter}

    def fuse(self, weights: dict[str, float], safe_fusing: bool = False) -> None:
        self.safe_fusing = safe_fusing
        for adapted in self.modules.values():
            adapted.fuse(weights)
        self.fused_scales.update(weights)

    def unfuse(self) -> None:
        for adapted in self.modules.values():
            adapted.unfuse()
        self.fused_scales = {}

    @property
    def fused(self) -> bool:
        return any(adapted.fused for adapted in self.modules.values())

    def remove_all(self) -> None:
        """Drop every adapter and hook; fused weights stay fused (diffusers' `fuse_lora` then
        `unload_lora_weights` keeps a merged model)."""
        with self._lock:
            for adapted in self.modules.values():
                adapted.remove()
            self.modules = {}
            self.adapters = {}
            self.active = {}


def model_loras(model: Any, name: str = "", create: bool = False) -> ModelLoras | None:
    """The adapters of `model` (created when `create`), or None."""
    found = getattr(model, _ATTRIBUTE, None) if isinstance(model, nn.Module) else None
    if found is None and create:
        found = ModelLoras(model, name)
        object.__setattr__(model, _ATTRIBUTE, found)
    return found


def loaded_adapters(models: Iterable[Any]) -> set[str]:
    return {name for model in models if (loras := model_loras(model)) for name in loras.adapters}
