"""Custom blocks shared as folders or Hub repos.

`save_custom_blocks` writes `modular_config.json` (class, `auto_map`, requirements) and copies
the Python file that defines the blocks; `load_custom_blocks` imports that file again, but only
with `trust_remote_code=True`, because importing it runs its code. Requirements are the blocks'
`_requirements` and those of every sub-block, flattened into one `{package: specifier}`; as in
diffusers, an unmet one is a warning (on save and before import) that names it, not an error.
The same folder may also hold a pipeline's weights and `modular_model_index.json`:
`ModularPipeline.from_pretrained` then runs these blocks with those components.

Not handled here: uploading to the Hub (copy the folder there).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import shutil
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blocks.loading import allow_component_library, resolve_files

if TYPE_CHECKING:
    from blocks.block import ModularPipelineBlocks

MODULAR_CONFIG = "modular_config.json"


def save_custom_blocks(blocks: ModularPipelineBlocks, save_directory: str | Path) -> None:
    import diffusers

    cls = type(blocks)
    source = inspect.getsourcefile(cls)
    if source is None:
        raise ValueError(f"{cls.__name__}: cannot find the file that defines it")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    library = Path(__file__).resolve().parent
    target = folder / Path(source).name
    # The library's own classes stay put; a file saved into its own folder stays as it is.
    if library not in Path(source).resolve().parents and not (
        target.exists() and target.samefile(source)
    ):
        shutil.copyfile(source, target)
    requirements = flatten_requirements(getattr(blocks, "_requirements", None))
    _warn_unmet(requirements, f"{cls.__name__} requires")
    config: dict[str, Any] = {
        "_class_name": cls.__name__,
        "_diffusers_version": diffusers.__version__,
        "auto_map": {"ModularPipelineBlocks": f"{Path(source).stem}.{cls.__name__}"},
    }
    if requirements:
        config["requirements"] = requirements
    (folder / MODULAR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def flatten_requirements(requirements: dict[str, Any] | None) -> dict[str, str]:
    """`{"torch": ">=2", "encoder": {"numpy": "1.26"}}` -> `{"torch": ">=2", "numpy": "==1.26"}`:
    sub-blocks' entries (nested under their names) merged in, a bare version pinned, two
    specifiers for one package combined."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    flat: dict[str, str] = {}

    def visit(mapping: dict[str, Any]) -> None:
        for package, spec in mapping.items():
            if isinstance(spec, dict):
                visit(spec)
                continue
            name = str(package).strip()
            if not name:
                raise ValueError("a requirement's package name is empty")
            text = "" if spec is None else str(spec).strip()
            if text and text[0] not in "<>=!~":
                text = f"=={text}"
            if text:
                try:
                    SpecifierSet(text)
                except InvalidSpecifier as error:
                    raise ValueError(f"requirement {name}: invalid specifier {text!r}") from error
            before = flat.get(name)
            if before and text and before != text:
                flat[name] = str(SpecifierSet(f"{before},{text}"))
            elif not before:
                flat[name] = text

    visit(requirements or {})
    return flat


def _warn_unmet(requirements: dict[str, str], owner: str) -> None:
    unmet = unmet_requirements(requirements)
    if unmet:
        warnings.warn(f"{owner}: {', '.join(unmet)}; it may not work here", UserWarning,
                      stacklevel=3)


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
        if spec and not SpecifierSet(spec).contains(installed, prereleases=True):
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
    _warn_unmet(flatten_requirements(config.get("requirements")), f"{path_or_repo_id} requires")
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
