"""A module's weights as one flat byte arena plus a weight-free skeleton, and back.

This is how the weight pool (`deployments.weight_pool`) shares weights between processes
without copying them: the registry loads a component once, `pack_module` splits it into

- a *skeleton*: the same module with every parameter and buffer on the meta device (pickled,
  a few kB: classes, configs, hooks, no data), and
- an *arena*: one contiguous uint8 array holding every distinct tensor's bytes at 64-byte
  aligned offsets, with a `TensorSlot` per tensor saying where it lives in the module.

The arena goes into Ray's object store once; `ray.get` in a replica maps it read-only without
a copy, and `assign_tensors` points the skeleton's parameters and buffers at views of it (on
the CPU: zero-copy; on an accelerator: the device copy is the only one the replica makes).
`release_tensors` puts them back on the meta device: the replica then holds no weight bytes
at all, and the next `assign_tensors` brings them back from the pool, not from disk.

Tensors are stored as raw bytes, so every dtype (bfloat16 included, which numpy lacks) round
trips exactly. Tied weights stay tied: aliases of one tensor share one slot. Pooled tensors
are read-only: a block that wrote into its weights would change them for every replica on
the node, and no inference block does.

No Ray here; unit-tested in-process.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ALIGNMENT = 64  # bytes; any dtype's view of an aligned offset is aligned


@dataclass(frozen=True)
class TensorSlot:
    """Where one module attribute's tensor lives in the arena."""

    module_path: str  # "" for the root module, else dotted (e.g. "down_blocks.0.resnets.1")
    name: str  # the parameter or buffer name on that module
    is_parameter: bool
    tensor_index: int  # tensors with the same index are one tensor (tied weights)
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PackedModule:
    """What the registry keeps per component, besides the arena's object reference."""

    skeleton: bytes  # pickled module with meta tensors
    slots: tuple[TensorSlot, ...]
    arena_bytes: int

    def build(self) -> torch.nn.Module:
        """A fresh skeleton (meta tensors) to `assign_tensors` into."""
        module = pickle.loads(self.skeleton)
        _register_unpickled(module)
        return module


def _register_unpickled(module: torch.nn.Module) -> None:
    """Redo the process-wide registration a model's constructor makes and unpickling skips.

    transformers (5.x) keeps, per model class, which outputs its hooks can record
    (`output_hidden_states=True`) in a registry that `PreTrainedModel.__init__` fills. In a
    replica that never constructed the class, an unpickled model would silently return no
    hidden states (a family that reads its text encoder's hidden states needs them).
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers: nothing known to redo
        return
    for submodule in module.modules():
        if isinstance(submodule, PreTrainedModel):
            _CAN_RECORD_REGISTRY[submodule] = submodule._can_record_outputs


def _attributes(module: torch.nn.Module):
    """(module_path, name, tensor, is_parameter) for every parameter and buffer, aliases too."""
    for path, owner in module.named_modules(remove_duplicate=False):
        for name, param in owner._parameters.items():
            if param is not None:
                yield path, name, param, True
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield path, name, buffer, False


def pack_module(module: torch.nn.Module) -> tuple[PackedModule, np.ndarray]:
    """Split `module` into a skeleton and an arena. `module` is left on the meta device (its
    data now lives only in the returned arena)."""
    slots: list[TensorSlot] = []
    index_of: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    offsets: list[int] = []
    size = 0
    for path, name, tensor, is_parameter in _attributes(module):
        key = id(tensor)
        if key not in index_of:
            index_of[key] = len(tensors)
            tensors.append(tensor)
            size = -(-size // ALIGNMENT) * ALIGNMENT
            offsets.append(size)
            size += tensor.numel() * tensor.element_size()
        index = index_of[key]
        slots.append(TensorSlot(path, name, is_parameter, index, offsets[index],
                                tensors[index].numel() * tensors[index].element_size(),
                                tensor.dtype, tuple(tensor.shape)))
    arena = np.zeros(size, dtype=np.uint8)
    for tensor, offset in zip(tensors, offsets, strict=True):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
        arena[offset:offset + raw.size] = raw
    del tensors
    release_tensors(module, slots)
    return PackedModule(pickle.dumps(module), tuple(slots), size), arena


def _owner(module: torch.nn.Module, path: str) -> torch.nn.Module:
    return module.get_submodule(path) if path else module


def assign_tensors(module: torch.nn.Module, slots: tuple[TensorSlot, ...] | list[TensorSlot],
                   arena: np.ndarray, device: str | torch.device = "cpu") -> None:
    """Point `module`'s parameters and buffers at `arena` (on the CPU: views, no copy; on
    another device: one copy there). `module` must have the structure `slots` came from."""
    device = torch.device(device)
    with warnings.catch_warnings():
        # Ray hands out the object store's pages read-only; torch warns that writing through
        # the tensor would be undefined. Pooled weights are never written (module docstring).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        base = torch.from_numpy(arena) if arena.size else torch.empty(0, dtype=torch.uint8)
    made: dict[int, torch.Tensor] = {}
    for slot in slots:
        tensor = made.get(slot.tensor_index)
        if tensor is None:
            tensor = base[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
            if device.type != "cpu":
                tensor = tensor.to(device)
            made[slot.tensor_index] = tensor
        owner = _owner(module, slot.module_path)
        if slot.is_parameter:
            owner._parameters[slot.name] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[slot.name] = tensor
    # Tied parameters: one Parameter object per tensor, as before packing.
    shared: dict[int, torch.nn.Parameter] = {}
    for slot in slots:
        if slot.is_parameter:
            owner = _owner(module, slot.module_path)
            first = shared.setdefault(slot.tensor_index, owner._parameters[slot.name])
            owner._parameters[slot.name] = first


def release_tensors(module: torch.nn.Module,
                    slots: tuple[TensorSlot, ...] | list[TensorSlot]) -> None:
    """Put every pooled tensor of `module` on the meta device: it holds no weight bytes."""
    made: dict[int, torch.Tensor] = {}
    for slot in slots:
        tensor = made.setdefault(
            slot.tensor_index, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))
        owner = _owner(module, slot.module_path)
        if slot.is_parameter:
            owner._parameters[slot.name] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[slot.name] = tensor


def resident_bytes(module: torch.nn.Module) -> dict[str, int]:
    """{device: bytes} of `module`'s distinct tensors that hold data (meta ones don't)."""
    seen: set[int] = set()
    totals: dict[str, int] = {}
    for _, _, tensor, _ in _attributes(module):
        if id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        device = str(tensor.device)
        totals[device] = totals.get(device, 0) + tensor.numel() * tensor.element_size()
    return totals


def folder_digest(folder: str | Path, chunk_bytes: int = 1 << 20) -> str | None:
    """sha256 over a component folder's files (names and bytes, sorted): equal digests mean
    byte-identical components. None when `folder` is not a local folder (e.g. a Hub id)."""
    root = Path(folder)
    if not root.is_dir():
        return None
    hasher = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        hasher.update(file.relative_to(root).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                hasher.update(chunk)
    return hasher.hexdigest()
