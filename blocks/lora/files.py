"""Finding and reading a LoRA file: a local file or folder, a Hub repo id, or a state dict.

`read_lora_file` returns the tensors and diffusers' adapter metadata (the peft `LoraConfig`
per component, which diffusers writes into the safetensors header under
`lora_adapter_metadata`, e.g. `{"unet.r": 8, "unet.lora_alpha": 16}`). What the keys mean
is `blocks.lora.keys`; `write_lora_file` writes diffusers' own layout.

Not handled here: key formats, models, and fetching anything but one file (a repo id is
resolved with `hf_hub_download`, which honours `HF_HUB_OFFLINE` and the HF cache).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


class LoraFileError(ValueError):
    """A LoRA source could not be found or read, or its keys fit no model; the message says
    which and why."""


@dataclass
class LoraFile:
    """A LoRA file's tensors (its own key names) and diffusers' adapter metadata, if any."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None
    source: str


def read_lora_file(
    source: str | os.PathLike | dict[str, torch.Tensor] | LoraFile,
    weight_name: str | None = None,
    **hub_kwargs: Any,
) -> LoraFile:
    """Read `source`: a state dict, a `.safetensors` (or `.bin`/`.pt`) file, a folder (its
    `weight_name`, else `pytorch_lora_weights.safetensors`, else its only safetensors file) or
    a Hub repo id (its `weight_name`, default `pytorch_lora_weights.safetensors`). A
    `LoraFile` already read (e.g. from a weight pool) is returned as it is."""
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, dict):
        return LoraFile(dict(source), None, "<state dict>")
    path = _local_file(Path(source).expanduser(), weight_name)
    if path is None:
        path = _hub_file(str(source), weight_name, **hub_kwargs)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            header = handle.metadata() or {}
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
        return LoraFile(tensors, metadata, str(path))
    try:
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise LoraFileError(f"LoRA file {path} could not be read: {error}") from error
    if not isinstance(tensors, dict):
        raise LoraFileError(f"LoRA file {path} holds a {type(tensors).__name__}, not a state dict")
    return LoraFile(tensors, None, str(path))


def _local_file(path: Path, weight_name: str | None) -> Path | None:
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    if weight_name is not None:
        if not (path / weight_name).is_file():
            raise LoraFileError(f"LoRA folder {path} has no file {weight_name!r}")
        return path / weight_name
    if (path / DEFAULT_WEIGHT_NAME).is_file():
        return path / DEFAULT_WEIGHT_NAME
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise LoraFileError(
            f"LoRA folder {path}: pass weight_name= to choose a file (safetensors files: {found})"
        )
    return candidates[0]


def _hub_file(repo_id: str, weight_name: str | None, **hub_kwargs: Any) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise LoraFileError(f"LoRA source {repo_id!r} is neither a file, a folder nor a repo id")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, weight_name or DEFAULT_WEIGHT_NAME, **hub_kwargs))
    except Exception as error:
        raise LoraFileError(f"LoRA source {repo_id!r}: {error}") from error


def write_lora_file(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `tensors` (diffusers' keys, e.g. `unet.<module>.lora_A.weight`) as safetensors,
    with `metadata` (peft config values by `<component>.<field>`) in the header as diffusers
    writes it, so diffusers' `load_lora_weights` reads the same scaling."""
    from safetensors.torch import save_file

    header = {"format": "pt"}
    if metadata:
        header[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path
