"""The models a service process has loaded, and their pipelines per scheduler.

`ModelRegistry` turns the models file into running pipelines: it writes tiny checkpoints where
`create_tiny` asks for them, builds each model's pipeline with `ModularPipeline.from_pretrained`
(or, for a family that needs no checkpoint, its declared blocks), loads its weights through one
shared `ComponentsManager`, and tracks each model's state (pending, loading, ready, failed) for
`/readyz`.

A request may name a scheduler, and schedulers hold per-request state (timesteps, step index,
multistep history): `LoadedModel.new_scheduler` gives every request its own scheduler object,
made with `from_config(<the checkpoint's scheduler>.config)` (for the checkpoint's own, a copy
of it). A pipeline per engine worker (`pipeline(worker)`) shares the model's weights (the very
same objects, through the ComponentsManager) and copies the other loaded components (a fast
tokenizer must not be used by two threads at once).

Not handled here: unloading models at run time, reloading a changed models file, and choosing
which requests run when (that is the engine's job).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blocks import ComponentsManager, ModularPipeline, ModularPipelineBlocks
from blocks.dtypes import DTYPES
from blocks.families import Family
from blocks.step_cache import (
    StepCacheConfig,
    cache_methods,
    cacheable_class,
    cacheable_component,
    hooks_for,
    step_cache_config,
)
from deployments.lora_cache import LoraCache, LoraLoader, LoraObserver, PipelineLoraLoader
from service.block_tree import block_tree
from service.latent_rgb import factors_for
from service.models_file import ModelConfig, ModelsFile

logger = logging.getLogger(__name__)

PENDING, LOADING, READY, FAILED = "pending", "loading", "ready", "failed"

BlocksTransform = Callable[["ModelConfig", ModularPipelineBlocks], ModularPipelineBlocks]


class ModelNotReady(RuntimeError):
    """The model is configured but still loading, or failed to load."""

    def __init__(self, name: str, state: str, error: str | None = None) -> None:
        self.name, self.state, self.error = name, state, error
        detail = "failed to load" if state == FAILED else "is still loading"
        super().__init__(f"model {name!r} {detail}")


@dataclass
class LoadedModel:
    """A ready model: its configuration, what its blocks accept, and its pipelines."""

    config: ModelConfig
    family: Family
    blocks: ModularPipelineBlocks  # the blocks every pipeline of this model runs
    base: ModularPipeline
    default_scheduler: str
    workflows: tuple[str, ...]
    input_names: frozenset[str]
    tree: dict[str, Any]
    step_cache_methods: tuple[str, ...] = ()  # what its denoiser supports
    step_cache: StepCacheConfig | None = None  # the models file's default (checked)
    _workers: dict[int, ModularPipeline] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _manager: Any = None
    loras: LoraCache | None = None  # the adapters requests may name, when it allows any

    def pin_loras(self, names: list[str]) -> None:
        """Load `names` (on first use) and keep them loaded until `unpin_loras(names)`
        (`LoraCache.acquire`; LoraLoadError when a file cannot be loaded)."""
        if self.loras is None:
            raise ValueError(f"model {self.name!r} has no LoRA adapters")
        self.loras.acquire(names)

    def unpin_loras(self, names: list[str]) -> None:
        if self.loras is not None:
            self.loras.release(names)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def device(self) -> str:
        return self.config.device

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(self.family.schedulers)

    def accepts(self, input_name: str) -> bool:
        return input_name in self.input_names

    def new_scheduler(self, name: str | None = None) -> Any:
        """A scheduler object of its own for one request: `name` (a request's scheduler), or
        the checkpoint's own (None). None when the model's blocks use no scheduler."""
        base = self.base.components.get("scheduler")
        if base is None:
            return None
        if name is None or name == self.default_scheduler:
            return copy.deepcopy(base)
        if name not in self.family.schedulers:
            raise ValueError(
                f"scheduler {name!r} is not one of {', '.join(self.schedulers)} "
                f"for model {self.name!r}"
            )
        return self.family.scheduler_class(name).from_config(base.config)

    def pipeline(self, worker: int = 0) -> ModularPipeline:
        """The pipeline engine worker `worker` runs blocks with, made on first use."""
        if worker == 0:
            return self.base
        with self._lock:
            pipe = self._workers.get(worker)
            if pipe is None:
                pipe = self._make_worker_pipeline(worker)
                self._workers[worker] = pipe
            return pipe

    def _make_worker_pipeline(self, worker: int) -> ModularPipeline:
        base = self.base
        pipe = self.blocks.init_pipeline(
            self.config.path, components_manager=self._manager,
            collection=f"{self.name}:worker{worker}",
        )
        # Weights are shared; other loaded components (tokenizers) are copied.
        loaded = {}
        for name, component in base.components.items():
            if component is None or name == "scheduler" \
                    or base.component_specs[name].default_creation_method != "from_pretrained":
                continue
            loaded[name] = component if isinstance(component, torch.nn.Module) \
                else copy.deepcopy(component)
        pipe.update_components(**loaded)
        # Components loaded later on first use get the model's dtype too.
        pipe.load_components(names=[], dtype=DTYPES[self.config.dtype])
        if base.components.get("scheduler") is not None:
            pipe.update_components(scheduler=copy.deepcopy(base.scheduler))
        pipe.set_progress_bar_config(disable=True)
        logger.info("model %s: pipeline for engine worker %d ready", self.name, worker)
        return pipe


class ModelRegistry:
    """Loads the configured models (in the background or on demand) and hands them out."""

    def __init__(
        self,
        models: ModelsFile,
        manager: ComponentsManager | None = None,
        on_components_loaded: Callable[[str, int], None] | None = None,
        blocks_transform: BlocksTransform | None = None,
        lora_observer: LoraObserver | None = None,
        lora_loader: Callable[[Any], LoraLoader] = PipelineLoraLoader,
    ) -> None:
        self.models = models
        # Ray mode: swaps heavy blocks for remote ones before the pipeline is made.
        self._blocks_transform = blocks_transform
        self.manager = manager if manager is not None else ComponentsManager()
        self._on_components_loaded = on_components_loaded
        self._lora_observer = lora_observer
        # Where a model's adapters load: its pipeline here (embedded), or nowhere here (Ray
        # mode: the replicas running the text encoder and denoiser load them).
        self._lora_loader = lora_loader
        self._lock = threading.Lock()
        self._states: dict[str, str] = dict.fromkeys(models.models, PENDING)
        self._errors: dict[str, str] = {}
        self._loaded: dict[str, LoadedModel] = {}
        self._thread: threading.Thread | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.models.models)

    @property
    def default_model(self) -> str:
        return self.models.default_model

    def config(self, name: str) -> ModelConfig:
        return self.models.models[name]

    def state(self, name: str) -> str:
        with self._lock:
            return self._states[name]

    def states(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {
                name: {"state": state, **({"error": self._errors[name]} if name in self._errors
                                          else {})}
                for name, state in self._states.items()
            }

    @property
    def ready(self) -> bool:
        with self._lock:
            return all(state == READY for state in self._states.values())

    def get(self, name: str) -> LoadedModel:
        """A ready model; KeyError when not configured, ModelNotReady while not ready."""
        with self._lock:
            if name not in self._states:
                raise KeyError(name)
            loaded = self._loaded.get(name)
            if loaded is None:
                raise ModelNotReady(name, self._states[name], self._errors.get(name))
            return loaded

    # -- loading -------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load every model on a background thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self.load_all, name="blockserve-model-loader", daemon=True
                )
                self._thread.start()
            return self._thread

    def load_all(self) -> None:
        """Load every model in order; a failure is recorded and the others still load."""
        for name in self.names:
            try:
                self.load(name)
            except Exception:  # recorded in the model's state; /readyz reports it
                logger.exception("model %s failed to load", name)

    def load(self, name: str) -> LoadedModel:
        """Load one model now (no-op when loaded); raises what loading raised."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            self._states[name] = LOADING
        try:
            loaded = self._build(self.models.models[name])
        except Exception as error:
            with self._lock:
                self._states[name] = FAILED
                self._errors[name] = f"{type(error).__name__}: {error}"
            raise
        factors_for(loaded)  # previews' latent -> RGB map, fitted on its VAE now, not mid-job
        with self._lock:
            self._loaded[name] = loaded
            self._states[name] = READY
            self._errors.pop(name, None)
        logger.info("model %s ready: workflows %s", name, ", ".join(loaded.workflows))
        return loaded

    def _build(self, config: ModelConfig) -> LoadedModel:
        family = config.family_info
        if family.needs_checkpoint:
            blocks = ModularPipeline.from_pretrained(ensure_checkpoint(config)).blocks
        else:
            blocks = family.blocks()
        tree = block_tree(blocks)
        declared = blocks.expected_components
        if self._blocks_transform is not None:
            blocks = self._blocks_transform(config, blocks)
        base = blocks.init_pipeline(
            config.path, components_manager=self.manager, collection=config.name
        )
        base.load_components(dtype=DTYPES[config.dtype], device=config.device, strict=True)
        base.set_progress_bar_config(disable=True)
        specs = base.component_specs
        loaded_count = sum(
            1 for n, c in base.components.items()
            if c is not None and specs[n].default_creation_method == "from_pretrained"
        )
        if self._on_components_loaded is not None:
            self._on_components_loaded(config.name, loaded_count)
        scheduler = base.components.get("scheduler")
        default_scheduler = family.scheduler_name_of(scheduler) if scheduler else None
        denoiser = cacheable_component(base.components)
        # In Ray mode the denoiser runs in a deployment (whose step scheduler applies each
        # job's cache): the class the blocks declare for it says which methods it supports.
        methods = cache_methods(denoiser if denoiser is not None else cacheable_class(declared))
        step_cache = step_cache_config(config.step_cache, owner=f"models.{config.name}.step_cache",
                                       allowed=methods)
        if step_cache is not None and denoiser is not None:  # checks that need the model
            hooks_for(denoiser).check(step_cache, denoiser, f"models.{config.name}.step_cache")
        loras = None
        if config.loras:
            loras = LoraCache(config.name, config.loras, self._lora_loader(base),
                              config.max_loaded_loras, self._lora_observer)
        return LoadedModel(
            config=config,
            family=family,
            blocks=blocks,
            base=base,
            default_scheduler=default_scheduler or "default",
            workflows=tuple(getattr(blocks, "available_workflows", ()) or ("text2image",)),
            input_names=frozenset(blocks.input_names),
            tree=tree,
            step_cache_methods=methods,
            step_cache=step_cache,
            _manager=self.manager,
            loras=loras,
        )


# A staging folder older than this is a crashed writer's, whatever its process id says (ids
# are reused); writing a tiny checkpoint takes seconds.
STALE_STAGING_SECONDS = 3600.0


def ensure_checkpoint(config: ModelConfig) -> str:
    """The model's checkpoint path, writing a tiny one first where `create_tiny` asks."""
    assert config.path is not None
    path = Path(config.path)
    if config.create_tiny is None:
        return config.path
    remove_stale_staging(path)
    if path.is_dir() and any(path.iterdir()):
        return config.path
    logger.info("model %s: writing a tiny %s checkpoint to %s", config.name,
                config.create_tiny, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place, so a crash never leaves half a model;
    # the staging folder's name carries this process's id, so a later start can tell a
    # crashed writer's leftovers (removed) from a live writer's (left alone).
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(path)}{os.getpid()}-",
                                    dir=path.parent))
    try:
        config.family_info.write_tiny(staging / "checkpoint")
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        try:
            (staging / "checkpoint").rename(path)
        except OSError:
            if not (path.is_dir() and any(path.iterdir())):  # not another process's win
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config.path


def _staging_prefix(path: Path) -> str:
    return f".{path.name}-"


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove what writers of `path`'s tiny checkpoint left behind when killed mid-write
    (`kill -9`, a power cut): staging folders whose process is gone, or that are older than
    `STALE_STAGING_SECONDS`. Returns the folders removed."""
    if not path.parent.is_dir():
        return []
    # `.NAME-PID-XXXXXXXX` (mkdtemp's suffix has no "-"), or `.NAME-XXXXXXXX` from versions
    # that did not record the writer; nothing else, so a sibling `NAME-2`'s are left alone.
    pattern = re.compile(rf"^{re.escape(_staging_prefix(path))}(?:(\d{{1,10}})-)?[a-z0-9_]{{8}}$")
    removed = []
    now = time.time()
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        writer = int(match.group(1)) if match.group(1) else None
        try:
            old = now - entry.stat().st_mtime > STALE_STAGING_SECONDS
        except FileNotFoundError:  # its writer just finished
            continue
        if old or writer is None or not _process_alive(writer):
            logger.warning("removing %s, left by a checkpoint writer that did not finish", entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
