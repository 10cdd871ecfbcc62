"""Finding checkpoints and loading components from them.

A checkpoint is a local folder or a Hugging Face Hub repo id holding `modular_model_index.json`
(written by blockserve's or diffusers' modular pipelines, in the same format) or diffusers'
`model_index.json`, plus one subfolder per component. A modular index may point a component at
another repo or folder; a local checkpoint that has the component's files itself (a downloaded
copy, a folder moved after saving) loads them from there.
For a repo id only the index is fetched first, and each subfolder only when its component is
loaded; `HF_HUB_OFFLINE=1` and the HF cache are honoured by `huggingface_hub` itself. A local
folder never touches the network. This module does not decide *which* components to load:
`ModularPipeline.load_components` does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from blocks.specs import ComponentSpec

MODULAR_INDEX = "modular_model_index.json"
_HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
DIFFUSERS_INDEX = "model_index.json"


class ComponentLoadError(RuntimeError):
    """A component could not be loaded; the message names it and its source."""


@dataclass
class CheckpointIndex:
    """What an index file says: the pipeline/blocks class, per-component entries, configs."""

    source: str
    class_name: str | None
    blocks_class_name: str | None
    components: dict[str, ComponentSpec] = field(default_factory=dict)
    component_classes: dict[str, tuple[str, str]] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)
    is_modular: bool = False
    revision: str | None = None

    def resolve(self, spec: ComponentSpec) -> ComponentSpec:
        """A block's spec completed from this checkpoint: by the index entry of the same name;
        else, for a spec that names a subfolder but no source, by that subfolder of this
        checkpoint (e.g. a `controlnet/` folder that diffusers' `model_index.json` does not
        list). A local checkpoint without that subfolder leaves the spec without a source."""
        found = self.components.get(spec.name)
        if found is not None:
            return spec.merged(found)
        if not spec.subfolder or spec.pretrained_model_name_or_path is not None:
            return spec
        if is_local(self.source) and not (Path(self.source).expanduser() / spec.subfolder).is_dir():
            return spec
        return replace(spec, pretrained_model_name_or_path=self.source,
                       revision=spec.revision or self.revision)


class CheckpointNotFound(FileNotFoundError):
    """A checkpoint folder does not exist, or a Hub repo's files can't be had; the message
    names the folder or repo."""


def is_local(path_or_repo_id: str | os.PathLike) -> bool:
    return Path(path_or_repo_id).expanduser().is_dir()


def looks_like_path(path_or_repo_id: str | os.PathLike) -> bool:
    """Whether it can only be a folder, never a Hub repo id ("org/name")."""
    text = str(path_or_repo_id)
    return (isinstance(path_or_repo_id, os.PathLike) or text.startswith(("/", ".", "~"))
            or "\\" in text or text.count("/") > 1)


def resolve_files(
    path_or_repo_id: str | os.PathLike,
    patterns: list[str],
    revision: str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """The local folder holding `patterns` of a checkpoint: the folder itself when local,
    else a snapshot of just those files from the Hub (or the HF cache when offline)."""
    if is_local(path_or_repo_id):
        return Path(path_or_repo_id).expanduser()
    if looks_like_path(path_or_repo_id):
        raise CheckpointNotFound(f"checkpoint folder not found: {path_or_repo_id}")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_repo_id), allow_patterns=patterns, revision=revision, **hub_kwargs
            )
        )
    except Exception as error:  # offline, unknown repo, no access, network: say which repo
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if os.environ.get(
            "HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") else ""
        raise CheckpointNotFound(
            f"checkpoint {str(path_or_repo_id)!r} is not a local folder and its files "
            f"{patterns} could not be had from the Hugging Face Hub{offline}: "
            f"{type(error).__name__}: {error}") from error


def read_index(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any
) -> CheckpointIndex:
    """Read a checkpoint's index (blockserve's modular one first, then diffusers')."""
    folder = resolve_files(
        path_or_repo_id, [MODULAR_INDEX, DIFFUSERS_INDEX], revision=revision, **hub_kwargs
    )
    for filename, modular in ((MODULAR_INDEX, True), (DIFFUSERS_INDEX, False)):
        index_file = folder / filename
        if index_file.is_file():
            raw = json.loads(index_file.read_text())
            return _parse_index(str(path_or_repo_id), raw, modular, revision)
    raise FileNotFoundError(
        f"{path_or_repo_id}: no {MODULAR_INDEX} or {DIFFUSERS_INDEX} found; is this a "
        "diffusers-style checkpoint?"
    )


def _parse_index(
    source: str, raw: dict[str, Any], modular: bool, revision: str | None
) -> CheckpointIndex:
    index = CheckpointIndex(
        source=source,
        class_name=raw.get("_class_name"),
        blocks_class_name=raw.get("_blocks_class_name"),
        is_modular=modular,
        revision=revision,
    )
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        is_component = isinstance(value, list) and len(value) >= 2
        if not is_component:
            index.configs[key] = value
            continue
        details = value[2] if modular and len(value) > 2 and isinstance(value[2], dict) else {}
        library, class_name = value[0], value[1]
        if (library is None or class_name is None) and details.get("type_hint"):
            library, class_name = details["type_hint"]  # listed but not loaded when saved
        if library is None or class_name is None:
            continue  # diffusers writes [null, null] for absent optional components
        index.component_classes[key] = (library, class_name)
        subfolder = details.get("subfolder", key) or ""
        recorded = details.get("pretrained_model_name_or_path") if modular else source
        if has_local_files(source, subfolder) or (modular and recorded is None):
            # The files are here (or the index says "this folder"): load them from here.
            recorded, component_revision = source, revision
        else:
            component_revision = details.get("revision", revision)
        index.components[key] = ComponentSpec(
            name=key,
            pretrained_model_name_or_path=recorded,
            subfolder=subfolder,
            variant=details.get("variant"),
            revision=component_revision,
        )
    return index


def has_local_files(source: str, subfolder: str) -> bool:
    """Whether local checkpoint `source` holds files in a component's `subfolder` (a component
    at the root, with no subfolder, can't be told from the index files there: not local)."""
    if not subfolder or not is_local(source):
        return False
    folder = Path(source).expanduser() / subfolder
    return folder.is_dir() and any(child.is_file() for child in folder.iterdir())


# The libraries an index entry may name. An index is data from a checkpoint, possibly a
# stranger's: importing whatever module it names would run that module's code, so only these
# are imported; custom blocks loaded with trust_remote_code add their own module.
COMPONENT_LIBRARIES = {"diffusers", "transformers"}


def allow_component_library(module_name: str) -> None:
    """Let index entries name classes of `module_name` (a top-level module); for code the
    user chose to trust (`trust_remote_code`)."""
    COMPONENT_LIBRARIES.add(module_name)


def import_class(library: str, class_name: str, entry: str | None = None) -> type:
    """`("diffusers", "AutoencoderKL")` -> the class, with a clear error naming the index
    `entry` when the library is not allowed or the class is missing."""
    where = f"index entry {entry!r}" if entry else "index entry"
    if not isinstance(library, str) or library.split(".")[0] not in COMPONENT_LIBRARIES:
        raise ComponentLoadError(
            f"{where} names library {library!r}; components load only from "
            f"{', '.join(sorted(COMPONENT_LIBRARIES))} (custom blocks add theirs when loaded "
            "with trust_remote_code=True)")
    try:
        found = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError, TypeError) as error:
        raise ComponentLoadError(f"{where}: cannot import {library}.{class_name}: {error}"
                                 ) from error
    if not (isinstance(found, type) and hasattr(found, "from_pretrained")):
        raise ComponentLoadError(f"{where}: {library}.{class_name} is not a component class "
                                 "(no from_pretrained)")
    return found


# Keywords of `from_pretrained` that say where and how to fetch files: they go to the Hub
# download (which then hands `from_pretrained` a local folder), not to the class.
_HUB_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")


def load_component(
    spec: ComponentSpec,
    index_class: tuple[str, str] | None = None,
    dtype: torch.dtype | None = None,
    load_kwargs: dict[str, Any] | None = None,
    **hub_kwargs: Any,
) -> Any:
    """Load one component from its spec's source; errors name the component and source.

    The class is the index's entry, else the spec's type hint, else diffusers' `AutoModel`
    (which reads the class from the component's config). `load_kwargs` go to the class's
    `from_pretrained` (e.g. `trust_remote_code`), but Hub keywords such as `token` go to the
    download."""
    load_kwargs = dict(load_kwargs or {})
    for key in _HUB_KEYWORDS:
        if key in load_kwargs:
            hub_kwargs[key] = load_kwargs.pop(key)
    source = spec.pretrained_model_name_or_path
    if source is None:
        raise ComponentLoadError(
            f"component {spec.name!r} has no source: give the pipeline a checkpoint or set "
            "it with update_components"
        )
    cls = import_class(*index_class, entry=spec.name) if index_class is not None else (
        spec.type_hint)
    if cls is None:
        from diffusers import AutoModel

        cls = AutoModel
    where = f"{source}" + (f" (subfolder {spec.subfolder!r})" if spec.subfolder else "")
    try:
        folder = resolve_files(
            source,
            [f"{spec.subfolder}/*"] if spec.subfolder else ["*"],
            revision=spec.revision,
            **hub_kwargs,
        )
        kwargs: dict[str, Any] = dict(load_kwargs)
        if spec.subfolder:
            kwargs["subfolder"] = spec.subfolder
        if spec.variant:
            kwargs["variant"] = spec.variant
        if cls.__module__.startswith("diffusers") and not _HAS_ACCELERATE:
            # What diffusers falls back to without accelerate anyway; said explicitly, it
            # loads the same way without warning about it on every start.
            kwargs.setdefault("low_cpu_mem_usage", False)
        if dtype is not None and _takes_dtype(cls):
            kwargs["dtype"] = dtype
        with _quiet_progress_bars():
            return cls.from_pretrained(str(folder), **kwargs)
    except ComponentLoadError:
        raise
    except Exception as error:  # any library's failure becomes one clear, named error
        raise ComponentLoadError(
            f"failed to load component {spec.name!r} ({cls.__name__}) from {where}: {error}"
        ) from error


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """transformers draws a "Loading weights" bar per model: noise on every start of a
    server, so it is off while loading unless the `blocks` logger is at DEBUG."""
    from transformers.utils import logging as transformers_logging

    if (logging.getLogger("blocks").isEnabledFor(logging.DEBUG)
            or not transformers_logging.is_progress_bar_enabled()):
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def _takes_dtype(cls: type) -> bool:
    """Models take a dtype (transformers and diffusers both spell it `dtype`); tokenizers and
    processors would store it in their config instead."""
    from diffusers import AutoModel

    return issubclass(cls, (torch.nn.Module, AutoModel))


def component_class_entry(component: Any) -> tuple[str, str]:
    """`(library, class name)` for an index entry, e.g. `("diffusers", "AutoencoderKL")`."""
    cls = type(component)
    return cls.__module__.split(".")[0], cls.__name__
