"""The LoRA adapters a served model allows: loaded on first use, kept in an LRU, pinned while
requests use them.

A model's `loras` in the models file name the adapters requests may ask for (never a path from
a request). `LoraCache.using(names)` makes sure those adapters are loaded into the model (its
denoiser and text encoders, shared by every pipeline and engine worker of the model) and pins
them until the request is done; at most `max_loaded_loras` stay loaded, and when a new one
needs room the least recently used adapter that no request is using is unloaded. When every
loaded adapter is in use the cache holds more for a while (a request is never refused or made
to wait for room) and shrinks back as they are released.

Loading itself is a `LoraLoader`: `PipelineLoraLoader` loads the file into a pipeline in this
process — the model's own pipeline in embedded mode; in Ray mode each TextEncoder and Denoiser
replica keeps a cache of its own (`deployments.block_host`, the file's tensors from the weight
pool), and the router's cache (`RemoteLoraLoader`) loads nothing: it pins and counts requests.
Events (`load`, `evict`, `request`) go to an observer for metrics (in Ray mode the replicas'
loads and evictions reach the router's metrics through the weight pool's registry,
`deployments.lora_events`).

Not handled here: validating request fields (`service.validation`), applying adapters to a
call (`blocks.lora.selection`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

LoraObserver = Callable[[str, str, str], None]  # (event, model, lora)


class LoraLoadError(RuntimeError):
    """An allowed adapter could not be loaded (a server-side problem: its file)."""


class LoraEntry(Protocol):
    """An allowed adapter (the models file's `loras` entry, `service.models_file.LoraEntry`)."""

    source: str
    weight_name: str | None
    scale: float


@dataclass(frozen=True)
class AdapterEntry:
    """A `LoraEntry` as plain data (what a Ray replica is given)."""

    source: str
    weight_name: str | None = None
    scale: float = 1.0


class LoraLoader(Protocol):
    def load(self, name: str, entry: LoraEntry) -> None: ...

    def unload(self, name: str) -> None: ...


class PipelineLoraLoader:
    """Loads adapters into a model's pipeline in this process. `components`: only into these
    (a replica holding some of the pipeline's models); `read(name, entry)`: the file's
    `blocks.lora.LoraFile` (default: read from `entry.source`), `forget(name)` after unloading."""

    def __init__(self, pipeline: Any, components: Sequence[str] | None = None,
                 read: Callable[[str, LoraEntry], Any] | None = None,
                 forget: Callable[[str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.components = components
        self.read = read
        self.forget = forget

    def load(self, name: str, entry: LoraEntry) -> None:
        source = entry.source if self.read is None else self.read(name, entry)
        self.pipeline.load_lora_weights(source, adapter_name=name,
                                        weight_name=entry.weight_name,
                                        components=self.components)

    def unload(self, name: str) -> None:
        self.pipeline.delete_adapters(name)
        if self.forget is not None:
            self.forget(name)


class RemoteLoraLoader:
    """Ray mode's router: the adapters load where the blocks run (each TextEncoder and
    Denoiser replica, on first use); the router's cache only pins and counts requests (its
    `loaded` are the adapters its requests used last; the loads and evictions are the
    replicas', counted there: `deployments.lora_events`)."""

    loads_here = False

    def load(self, name: str, entry: LoraEntry) -> None:
        return None

    def unload(self, name: str) -> None:
        return None


class LoraCache:
    """One model's allowed adapters and which are loaded (module docstring)."""

    def __init__(self, model: str, entries: Mapping[str, LoraEntry], loader: LoraLoader,
                 capacity: int, observer: LoraObserver | None = None) -> None:
        self.model = model
        self.entries = dict(entries)
        self.loader = loader
        self.capacity = capacity
        self.observer = observer
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def describe(self) -> list[dict[str, Any]]:
        """Each allowed adapter: name, default scale, loaded or not (no paths)."""
        loaded = set(self.loaded)
        return [{"name": name, "scale": entry.scale, "loaded": name in loaded}
                for name, entry in self.entries.items()]

    @contextlib.contextmanager
    def using(self, names: Sequence[str]) -> Iterator[None]:
        """`names` loaded and pinned for the block (loading on first use; LoraLoadError when
        a file cannot be loaded)."""
        self.acquire(names)
        try:
            yield
        finally:
            self.release(names)

    def acquire(self, names: Sequence[str]) -> None:
        for name in names:
            if self.observer is not None:
                self.observer("request", self.model, name)
        with self._lock:
            pinned = []
            try:
                for name in names:
                    self._load_locked(name)
                    self._pins[name] += 1
                    pinned.append(name)
            except BaseException:
                for name in pinned:
                    self._pins[name] -= 1
                raise
            self._shrink_locked()

    def release(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                self._pins[name] -= 1
                if self._pins[name] <= 0:
                    del self._pins[name]
            self._shrink_locked()

    def _load_locked(self, name: str) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        if name not in self.entries:
            raise KeyError(f"lora {name!r} is not allowed for model {self.model!r}")
        # Room first, so that memory never holds more than the capacity when it can be helped.
        self._shrink_locked(room_for=1)
        try:
            self.loader.load(name, self.entries[name])
        except Exception as error:
            logger.exception("model %s: lora %s failed to load", self.model, name)
            raise LoraLoadError(f"lora '{name}' of model '{self.model}' failed to load; see "
                                "the server log") from error
        self._loaded[name] = None
        logger.info("model %s: lora %s loaded (%d loaded)", self.model, name, len(self._loaded))
        if self.observer is not None and getattr(self.loader, "loads_here", True):
            self.observer("load", self.model, name)

    def _shrink_locked(self, room_for: int = 0) -> None:
        """Unload least recently used unpinned adapters until `room_for` more fit."""
        for name in list(self._loaded):
            if len(self._loaded) + room_for <= self.capacity:
                return
            if self._pins[name] > 0:
                continue
            self.loader.unload(name)
            del self._loaded[name]
            logger.info("model %s: lora %s unloaded (least recently used)", self.model, name)
            if self.observer is not None and getattr(self.loader, "loads_here", True):
                self.observer("evict", self.model, name)
