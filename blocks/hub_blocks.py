"""Custom blocks shared as folders or Hub repos.

`save_custom_blocks` writes `modular_config.json` (class, `auto_map`, requirements) and copies
the Python file that defines the blocks; `load_custom_blocks` imports that file again, but only
with `trust_remote_code=True`, because importing it runs its code. Requirements are checked
before import so a missing package is reported by name rather than as an ImportError midway.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blocks.loading import allow_component_library, resolve_files

if TYPE_CHECKING:
    from blocks.block import ModularPipelineBlocks

MODULAR_CONFIG = "modular_config.json"


def save_custom_blocks(blocks: ModularPipelineBlocks, save_directory: str | Path) -> None:
    cls = type(blocks)
    source = inspect.getsourcefile(cls)
    if source is None:
        raise ValueError(f"{cls.__name__}: cannot find the file that defines it")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / Path(source).name)
    config = {
        "_class_name": cls.__name__,
        "auto_map": {"ModularPipelineBlocks": f"{Path(source).stem}.{cls.__name__}"},
        "requirements": dict(getattr(cls, "requirements", {}) or {}),
    }
    (folder / MODULAR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def has_custom_blocks(path_or_repo_id: str, **hub_kwargs: Any) -> bool:
    folder = resolve_files(path_or_repo_id, [MODULAR_CONFIG], **hub_kwargs)
    return (folder / MODULAR_CONFIG).is_file()


def unmet_requirements(requirements: dict[str, str]) -> list[str]:
    """`{"torch": ">=2.0"}` -> the entries not satisfied here, as readable strings."""
    from packaging.specifiers import SpecifierSet

    unmet = []
    for package, spec in requirements.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            unmet.append(f"{package}{spec} (not installed)")
            continue
        if spec and installed not in SpecifierSet(spec):
            unmet.append(f"{package}{spec} (installed: {installed})")
    return unmet


def load_custom_blocks(
    path_or_repo_id: str, trust_remote_code: bool = False, **hub_kwargs: Any
) -> ModularPipelineBlocks:
    folder = resolve_files(path_or_repo_id, [MODULAR_CONFIG, "*.py"], **hub_kwargs)
    config_file = folder / MODULAR_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path_or_repo_id}: no {MODULAR_CONFIG}; not a blocks folder")
    config = json.loads(config_file.read_text())
    module_name, class_name = config["auto_map"]["ModularPipelineBlocks"].rsplit(".", 1)
    source = folder / f"{module_name}.py"
    if not trust_remote_code:
        raise ValueError(
            f"{path_or_repo_id} defines its blocks in code ({source.name}); importing it runs "
            "that code. Review it, then pass trust_remote_code=True to load it."
        )
    unmet = unmet_requirements(config.get("requirements", {}))
    if unmet:
        raise ImportError(f"{path_or_repo_id} requires: {', '.join(unmet)}")
    # A name unique to this file's content, so two versions of a module don't collide.
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    unique_name = f"blockserve_custom_{module_name}_{digest}"
    module = sys.modules.get(unique_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(unique_name, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique_name] = module
        spec.loader.exec_module(module)
        allow_component_library(unique_name)  # trusted: its classes may appear in an index
    return getattr(module, class_name)()
