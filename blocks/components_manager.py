"""The weight pool of one process: load once, share, account for bytes, offload under a budget.

A `ComponentsManager` holds the components pipelines run with — mostly `torch.nn.Module`s, also
schedulers, tokenizers and processors — and knows nothing about blocks. It does three jobs:

1. **Sharing.** `add` returns the id of an entry that is already held when the new component
   is the same one: the very same object, the same load id (`repo|subfolder|variant|revision`)
   at the same dtype, or — for modules — the same content (class, config, and every tensor's
   name, dtype, shape and bytes), so identical weights loaded from two folders are one entry.
   The caller then uses `get(id)` and drops its own copy: sharing is real, not a warning. Content
   hashing costs a pass over the weights, so it only runs when another held module has the same
   structure (class, config, tensor names/dtypes/shapes); config is part of identity because a
   VAE's `scaling_factor`, say, lives in its config, not its weights.
2. **Accounting.** Bytes per component and per device, a `summary()` table, and a log of every
   move the manager makes (`offload_log`).
3. **Offloading under a budget.** After `enable_auto_offload(device, budget)`, code runs models
   inside `with manager.using([...]):`. Entering marks them in use (a re-entrant refcount) and
   puts them on the device; when they don't fit, the manager offloads the smallest set of idle
   resident modules that frees enough room (ties: least recently used) and never one in use.
   If even offloading every idle module isn't enough it raises `ComponentOutOfMemoryError`,
   which says what was needed and what is held. A real `torch.OutOfMemoryError` during a move
   (the budget is an estimate; the allocator has the last word) offloads every idle module
   and retries once. Modules move with `nn.Module.to`, which is in place, so the pipelines
   holding them see the move. Moves happen under the manager's one lock: they share one
   host-device link anyway, and it keeps "in use by another thread" exact. Using modules that
   are already placed only takes the lock for a refcount.

Residency and testing without a GPU
-----------------------------------
What counts against the budget is the manager's own residency record, not a guess from where
tensors happen to sit: a module becomes resident when `using` moves it to the device and stops
being resident when the manager offloads it to `offload_device` (default "cpu"). A module that
already sits on the device when auto offload is enabled (or when it is added) starts resident —
unless the device *is* the offload device, where "already there" and "offloaded" can't be told
apart, so it starts offloaded. That one rule is what lets the whole policy run unchanged on a
CPU-only machine with `device="cpu"`: every decision, every `.to()` call, the budget checks, the
eviction choice, the in-use protection, the errors and the log are the same code as on CUDA;
only the copy itself is a no-op. Tests that fake a device's free memory pass `free_memory_fn`.
What the CPU cannot show — that weights come back from a real device bit-identical — is covered
by a CUDA test that runs wherever a GPU is present.

Deliberately not handled here: per-layer or sequential offload with forward hooks (whole models
move); splitting one model across devices; disk offload; waiting for memory that another thread's
in-use models hold (we raise instead — queueing belongs to the caller's scheduler); moves made
behind the manager's back while auto offload is on; activation memory (that is what `reserve` is
for); weights edited in place after `add` (their content hash is computed once); sharing
across processes (the deployments' registry does that).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from blocks.eviction import EvictionCandidate, plan_eviction

logger = logging.getLogger(__name__)

# Reasons an `OffloadRecord` is written; the first two put a module on the device.
LOAD, LOAD_RETRY = "load", "load-retry"
EVICT, EVICT_AFTER_OOM, ROLLBACK = "evict", "evict-oom", "rollback"
_LOAD_REASONS = frozenset({LOAD, LOAD_RETRY})


class ComponentOutOfMemoryError(RuntimeError):
    """Components can't be placed on the device, even after offloading every idle one.

    Attributes: `needed` (id -> bytes still to place), `room` (bytes free under the budget before
    offloading), `budget` (bytes, or None when only the device's free memory limits), and `held`
    (resident components as `(id, bytes, in_use)`).
    """

    def __init__(
        self,
        message: str,
        needed: dict[str, int],
        room: int,
        budget: int | None,
        held: list[tuple[str, int, bool]],
    ) -> None:
        super().__init__(message)
        self.needed = needed
        self.room = room
        self.budget = budget
        self.held = held


@dataclass(frozen=True)
class OffloadRecord:
    """One move made by the manager, written after the move succeeded."""

    time: float  # time.time() of the move
    component_id: str
    from_device: str
    to_device: str
    bytes: int
    reason: str  # load | load-retry | evict | evict-oom | rollback
    resident_bytes: int  # what counts against the budget once this move is done

    @property
    def is_load(self) -> bool:
        """True for a move onto the managed device, False for an offload."""
        return self.reason in _LOAD_REASONS


@dataclass
class _Entry:
    id: str
    name: str  # the name the entry was first added under; ids derive from it
    component: Any
    names: set[str]  # every name the entry was added under (shared entries have several)
    load_ids: set[str]
    # (load id, requested dtype) of every load that produced or shared this entry; a later
    # load asking for the same pair gets this object without reading anything (`find_loaded`).
    loads: set[tuple[str, str]]
    loaded_dtype: torch.dtype | None  # the dtype it had when added, to notice conversions
    added_time: float  # time.time() when first added
    collections: dict[str, str]  # collection -> the name the entry has in that collection
    signature: str | None  # cheap structural identity of a module; None for other objects
    digest: str | None = None  # content hash, computed only when a signature collides
    refcount: int = 0  # active `using` contexts
    last_used_tick: int = 0  # logical clock: orders LRU without relying on timer resolution
    last_used_at: float | None = None  # time.monotonic(), for display
    resident: bool = False  # counted against the device budget (see module docstring)

    @property
    def is_module(self) -> bool:
        return isinstance(self.component, torch.nn.Module)


@dataclass
class _OffloadPolicy:
    device: torch.device
    offload_device: torch.device
    budget: int | None
    reserve: int
    free_memory_fn: Callable[[], int] | None
    # diffusers-style `(resident models, model id, model, device) -> models to offload`,
    # asked before each placement (see `blocks.offload_strategy`); the budget still binds.
    strategy: OffloadStrategy | None = None


class _Resident(NamedTuple):
    """What an offload strategy sees of an idle resident model."""

    model_id: str
    model: Any


OffloadStrategy = Callable[[list[_Resident], str, Any, torch.device], list[Any]]


@dataclass
class _Use:
    """What one `using` call holds, so exit releases exactly what enter took."""

    entries: list[_Entry] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)


class ComponentsManager:
    """Holds, shares, accounts for and offloads the components of one process. Thread-safe."""

    def __init__(self, log_size: int = 10_000) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        # id(component) -> entry id; the entry keeps the object alive, so ids are never reused.
        self._by_object: dict[int, str] = {}
        self._name_counts: dict[str, int] = {}
        self._tick = 0
        self._policy: _OffloadPolicy | None = None
        # Bounded: a long-running server moves models all day.
        self._log: deque[OffloadRecord] = deque(maxlen=log_size)

    # ------------------------------------------------------------------ adding and sharing

    def add(
        self,
        name: str,
        component: object,
        collection: str | None = None,
        load_id: str | None = None,
        requested_dtype: torch.dtype | None = None,
    ) -> str:
        """Hold `component` and return its id, or the id of the entry it duplicates.

        When an id of an existing entry comes back, that entry's object is the one to use:
        `manager.get(id)`. A collection already holding another component under `name` has that
        one replaced (the replaced entry stays in the pool; `remove` drops it). `load_id` with
        `requested_dtype` (None: the checkpoint's own) records the load that made it, for
        `find_loaded`.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"ComponentsManager.add: name must be a non-empty str, got {name!r}")
        dtype = _module_dtype(component)
        signature = _structure_signature(component)
        with self._lock:
            existing = self._find_same_object_or_load_id(component, load_id, dtype)
            look_alikes = self._same_structure(signature) if existing is None else []
        # Content is hashed only when another module looks the same, and outside the lock:
        # hashing reads every weight (seconds for a large model), and running requests shouldn't
        # stall behind a load.
        digest = _content_digest(component) if look_alikes else None
        digests = {e.id: _content_digest(e.component) for e in look_alikes if e.digest is None}
        with self._lock:
            for entry_id, entry_digest in digests.items():
                if entry_id in self._entries:
                    self._entries[entry_id].digest = entry_digest
            if existing is None:
                existing = self._find_duplicate(component, load_id, dtype, signature, digest)
            if existing is not None:
                self._share(existing, name, collection, load_id)
                entry = existing
            else:
                entry = self._insert(name, component, signature, digest, load_id)
                if collection is not None:
                    self._join_collection(entry, collection, name)
            if load_id is not None:
                entry.loads.add((load_id, str(requested_dtype)))
            return entry.id

    def _find_same_object_or_load_id(
        self, component: object, load_id: str | None, dtype: torch.dtype | None
    ) -> _Entry | None:
        entry_id = self._by_object.get(id(component))
        if entry_id is not None:
            return self._entries[entry_id]
        if load_id is None:
            return None
        for entry in self._entries.values():
            # The live dtype: a held module converted since it was added is no longer that load.
            if load_id in entry.load_ids and _module_dtype(entry.component) == dtype:
                return entry
        return None

    def _same_structure(self, signature: str | None) -> list[_Entry]:
        if signature is None:
            return []
        for entry in self._entries.values():
            # A held module may have been converted (say, to float16) since it was added.
            live = _structure_signature(entry.component)
            if live != entry.signature:
                entry.signature, entry.digest = live, None
        return [e for e in self._entries.values() if e.signature == signature]

    def _find_duplicate(
        self,
        component: object,
        load_id: str | None,
        dtype: torch.dtype | None,
        signature: str | None,
        digest: str | None,
    ) -> _Entry | None:
        # Re-checked under the lock: another thread may have added it while we were hashing.
        found = self._find_same_object_or_load_id(component, load_id, dtype)
        if found is not None or signature is None:
            return found
        for entry in self._entries.values():
            if entry.signature != signature:
                continue
            if entry.digest is None:  # added by another thread while we hashed: rare, hash now
                entry.digest = _content_digest(entry.component)
            if digest is None:
                digest = _content_digest(component)
            if entry.digest == digest:
                return entry
        return None

    def _share(self, entry: _Entry, name: str, collection: str | None, load_id: str | None) -> None:
        logger.info("ComponentsManager: %r is shared as existing %s", name, entry.id)
        entry.names.add(name)
        if load_id is not None:
            entry.load_ids.add(load_id)
        if collection is not None:
            self._join_collection(entry, collection, name)

    def _insert(
        self,
        name: str,
        component: object,
        signature: str | None,
        digest: str | None,
        load_id: str | None,
    ) -> _Entry:
        count = self._name_counts.get(name, 0) + 1
        self._name_counts[name] = count  # never reused, so ids stay unique after removals
        entry = _Entry(
            id=f"{name}_{count}",
            name=name,
            component=component,
            names={name},
            load_ids={load_id} if load_id is not None else set(),
            loads=set(),
            loaded_dtype=_module_dtype(component),
            added_time=time.time(),
            collections={},
            signature=signature,
            digest=digest,
        )
        entry.resident = self._starts_resident(entry)
        self._entries[entry.id] = entry
        self._by_object[id(component)] = entry.id
        return entry

    def _join_collection(self, entry: _Entry, collection: str, name: str) -> None:
        for other in self._entries.values():
            if other is not entry and other.collections.get(collection) == name:
                logger.info(
                    "ComponentsManager: %s replaces %s as %r in collection %r",
                    *(entry.id, other.id, name, collection),
                )
                del other.collections[collection]
        entry.collections[collection] = name

    # ------------------------------------------------------------------ lookup

    def get(self, component_id: str) -> Any:
        """The object held under `component_id`."""
        with self._lock:
            return self._entry(component_id).component

    def find_loaded(self, load_id: str | None, dtype: torch.dtype | None = None) -> Any:
        """The component an earlier load of `load_id` at `dtype` (None: the checkpoint's own)
        produced, if it is held and has not been converted since; else None. A pipeline asks
        this before reading weights, so a second pipeline of a checkpoint reads nothing."""
        if load_id is None:
            return None
        key = (load_id, str(dtype))
        with self._lock:
            for entry in self._entries.values():
                if key in entry.loads and _module_dtype(entry.component) == entry.loaded_dtype:
                    return entry.component
        return None

    @property
    def components(self) -> dict[str, Any]:
        """A snapshot: id -> component, in the order they were added."""
        with self._lock:
            return {entry.id: entry.component for entry in self._entries.values()}

    def get_model_info(
        self, component_id: str, fields: str | list[str] | None = None
    ) -> dict[str, Any]:
        """What is known about one component, as diffusers' manager reports it: `model_id`,
        `added_time`, `collection`, and for modules `class_name`, `size_gb` (parameters and
        buffers), `adapters`, `has_hook` (always False: this manager moves whole models
        without hooks), `execution_device` and `quantization`. `fields` picks some."""
        allowed = ("model_id", "added_time", "collection", "class_name", "size_gb", "adapters",
                   "has_hook", "execution_device", "ip_adapter", "quantization")
        wanted = [fields] if isinstance(fields, str) else fields
        unknown = [f for f in wanted or [] if f not in allowed]
        if unknown:
            raise ValueError(
                f"ComponentsManager.get_model_info: unknown field(s) {unknown}; "
                f"valid: {', '.join(allowed)}"
            )
        with self._lock:
            entry = self._entry(component_id)
            info: dict[str, Any] = {
                "model_id": entry.id,
                "added_time": entry.added_time,
                "collection": ", ".join(sorted(entry.collections)) or None,
            }
            if entry.is_module:
                module = entry.component
                quantizer = getattr(module, "hf_quantizer", None)
                info.update(
                    class_name=type(module).__name__,
                    size_gb=_module_bytes(module) / 1024**3,
                    adapters=list(module.peft_config) if hasattr(module, "peft_config") else None,
                    has_hook=False,
                    execution_device=self._policy.device if self._policy is not None else None,
                    quantization=quantizer.quantization_config.to_dict()
                    if quantizer is not None else None,
                )
        return info if wanted is None else {k: v for k, v in info.items() if k in wanted}

    def get_one(
        self,
        component_id: str | None = None,
        name: str | None = None,
        collection: str | None = None,
        load_id: str | None = None,
    ) -> Any:
        """The one component matching every given filter; `name` may be a `search` pattern."""
        with self._lock:
            matches = [
                entry
                for entry in self._entries.values()
                if (component_id is None or entry.id == component_id)
                and (collection is None or collection in entry.collections)
                and (load_id is None or load_id in entry.load_ids)
            ]
            if name is not None:
                matcher = _compile_pattern(name)
                matches = [e for e in matches if matcher(self._match_keys(e, collection))]
            if len(matches) == 1:
                return matches[0].component
            filters = _describe_filters(component_id, name, collection, load_id)
            if matches:
                ids = ", ".join(e.id for e in matches)
                raise ValueError(
                    f"ComponentsManager.get_one: {len(matches)} components match {filters}: {ids}; "
                    "narrow it with component_id or collection"
                )
            raise ValueError(
                f"ComponentsManager.get_one: no component matches {filters}; "
                f"held: {self._held_ids()}"
            )

    def get_components_by_names(
        self, names: Iterable[str], collection: str | None = None
    ) -> dict[str, Any]:
        """`{name: component}` with exactly one component per name (within `collection`)."""
        with self._lock:
            found: dict[str, Any] = {}
            for name in names:
                matches = [
                    e for e in self._entries.values() if name in self._names_of(e, collection)
                ]
                where = f" in collection {collection!r}" if collection is not None else ""
                if len(matches) != 1:
                    what = ", ".join(e.id for e in matches) if matches else "none"
                    raise ValueError(
                        f"ComponentsManager: expected one component named {name!r}{where}, "
                        f"found {what}; held: {self._held_ids()}"
                    )
                found[name] = matches[0].component
            return found

    def search(self, pattern: str, collection: str | None = None) -> list[str]:
        """Ids whose names or id match `pattern`, in the order they were added.

        `pattern` is an fnmatch glob (`unet*`, `*encoder*`); `a|b` matches either; a leading `!`
        negates the whole pattern (`!vae|unet`: everything but the vae and the unet).
        """
        matcher = _compile_pattern(pattern)
        with self._lock:
            return [
                entry.id
                for entry in self._entries.values()
                if (collection is None or collection in entry.collections)
                and matcher(self._match_keys(entry, collection))
            ]

    @property
    def collections(self) -> dict[str, set[str]]:
        """A snapshot: collection -> ids of its components."""
        with self._lock:
            result: dict[str, set[str]] = {}
            for entry in self._entries.values():
                for collection in entry.collections:
                    result.setdefault(collection, set()).add(entry.id)
            return result

    def __contains__(self, item: object) -> bool:
        """An id, or a held object."""
        with self._lock:
            if isinstance(item, str) and item in self._entries:
                return True
            return id(item) in self._by_object

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _entry(self, component_id: str) -> _Entry:
        entry = self._entries.get(component_id)
        if entry is None:
            raise ValueError(
                f"ComponentsManager: unknown component id {component_id!r}; "
                f"held: {self._held_ids()}"
            )
        return entry

    def _held_ids(self) -> str:
        return ", ".join(self._entries) or "nothing"

    @staticmethod
    def _names_of(entry: _Entry, collection: str | None) -> set[str]:
        if collection is None:
            return entry.names
        name = entry.collections.get(collection)
        return {name} if name is not None else set()

    def _match_keys(self, entry: _Entry, collection: str | None) -> set[str]:
        return self._names_of(entry, collection) | {entry.id}

    # ------------------------------------------------------------------ removal

    def remove(self, component_id: str) -> Any:
        """Stop holding a component and return it; it is not moved. Refused while it is in use."""
        with self._lock:
            entry = self._entry(component_id)
            if entry.refcount:
                raise RuntimeError(
                    f"ComponentsManager.remove: {component_id} is in use "
                    f"({entry.refcount} active using() contexts)"
                )
            del self._entries[component_id]
            del self._by_object[id(entry.component)]
            return entry.component

    def remove_from_collection(self, component_id: str, collection: str) -> None:
        """Take a component out of a collection; the pool keeps it (`remove` drops it)."""
        with self._lock:
            entry = self._entry(component_id)
            if collection not in entry.collections:
                member_of = ", ".join(sorted(entry.collections)) or "no collection"
                raise ValueError(
                    f"ComponentsManager: {component_id} is not in collection {collection!r}; "
                    f"it is in {member_of}"
                )
            del entry.collections[collection]

    # ------------------------------------------------------------------ memory accounting

    def component_bytes(self, component_id: str) -> int:
        """Parameter + buffer bytes of a module; 0 for anything else."""
        with self._lock:
            return _module_bytes(self._entry(component_id).component)

    def bytes_by_device(self) -> dict[str, int]:
        """Bytes of every held tensor, by the device it is on now."""
        totals: dict[str, int] = {}
        with self._lock:
            for entry in self._entries.values():
                for tensor in _tensors(entry.component):
                    key = str(tensor.device)
                    totals[key] = totals.get(key, 0) + _tensor_bytes(tensor)
        return totals

    def device_of(self, component_id: str) -> torch.device | None:
        """Where a module's first tensor is; None for objects without tensors."""
        with self._lock:
            return _device_of(self._entry(component_id).component)

    def resident_bytes(self) -> int:
        """Bytes counted against the auto-offload budget (0 when auto offload is off)."""
        with self._lock:
            return sum(_module_bytes(e.component) for e in self._entries.values() if e.resident)

    def is_resident(self, component_id: str) -> bool:
        """Whether the manager counts this component as placed on its auto-offload device."""
        with self._lock:
            return self._entry(component_id).resident

    def use_count(self, component_id: str) -> int:
        """How many `using` contexts hold this component right now."""
        with self._lock:
            return self._entry(component_id).refcount

    @property
    def execution_device(self) -> torch.device | None:
        """The auto-offload device blocks should run on; None when auto offload is off."""
        with self._lock:
            return self._policy.device if self._policy is not None else None

    @property
    def offload_log(self) -> list[OffloadRecord]:
        """A snapshot of the most recent moves, oldest first."""
        with self._lock:
            return list(self._log)

    def summary(self) -> str:
        """A table of what is held: id, class, device, dtype, bytes, collections, last used."""
        with self._lock:
            rows = [_summary_row(entry, time.monotonic()) for entry in self._entries.values()]
            header = self._summary_header()
        columns = ("id", "class", "device", "dtype", "bytes", "collections", "last used")
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = [header, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return self.summary()

    def _summary_header(self) -> str:
        devices = ", ".join(f"{d}: {_format_bytes(b)}" for d, b in self.bytes_by_device().items())
        header = f"ComponentsManager: {len(self._entries)} components ({devices or 'no weights'})"
        policy = self._policy
        if policy is None:
            return header + "; auto offload off"
        budget = _format_bytes(policy.budget) if policy.budget is not None else "device free memory"
        resident = ", ".join(e.id for e in self._entries.values() if e.resident) or "none"
        return (
            f"{header}; auto offload to {policy.device} (home {policy.offload_device}): "
            f"budget {budget}, reserve {_format_bytes(policy.reserve)}, "
            f"resident {_format_bytes(self.resident_bytes())} [{resident}]"
        )

    # ------------------------------------------------------------------ auto offload

    def enable_auto_offload(
        self,
        device: str | torch.device,
        memory_budget: int | float | None = None,  # int: bytes; float: a fraction
        reserve: int = 0,
        offload_device: str | torch.device = "cpu",
        free_memory_fn: Callable[[], int] | None = None,
        offload_strategy: OffloadStrategy | None = None,
    ) -> None:
        """Place modules on `device` when used, offloading idle ones to `offload_device`.

        `memory_budget`: bytes (int), a fraction of the device's total memory (float in (0, 1]),
        or None to be limited by the device's free memory alone. `reserve`: bytes kept free for
        activations. `free_memory_fn`: the device's free bytes right now; defaults to CUDA's
        (free plus what torch's caching allocator holds unused), and when present also limits
        placement, so other processes on the device are respected. `offload_strategy` (e.g.
        `blocks.offload_strategy.AutoOffloadStrategy()`) picks models to offload before each
        placement, as diffusers' strategies do; it alone may stand for the budget.
        """
        target = _normalize_device(torch.device(device))
        if free_memory_fn is None and target.type == "cuda":
            free_memory_fn = _cuda_free_memory_fn(target)
        budget = _resolve_budget(memory_budget, target)
        if budget is None and free_memory_fn is None and offload_strategy is None:
            raise ValueError(
                f"ComponentsManager.enable_auto_offload: {target} has no free-memory query; "
                "pass memory_budget in bytes or a free_memory_fn"
            )
        if reserve < 0 or (budget is not None and reserve >= budget):
            raise ValueError(
                f"ComponentsManager.enable_auto_offload: reserve must be in [0, budget), "
                f"got reserve={reserve} with budget={budget}"
            )
        policy = _OffloadPolicy(
            target, _normalize_device(torch.device(offload_device)), budget, reserve,
            free_memory_fn, offload_strategy,
        )
        with self._lock:
            previous, self._policy = self._policy, policy
            # Re-enabling for the same placement (say, a new budget) keeps what we know.
            keep = previous is not None and _same_placement(previous, policy)
            for entry in self._entries.values():
                entry.resident = entry.resident if keep else self._starts_resident(entry)

    def disable_auto_offload(self) -> None:
        """Stop moving modules; they stay where they are. `using` keeps tracking use."""
        with self._lock:
            self._policy = None
            for entry in self._entries.values():
                entry.resident = False

    @contextmanager
    def using(self, components: Iterable[object]) -> Iterator[list[Any]]:
        """Hold components (objects or ids) in use for the block, placed on the device.

        Yields the objects in the order given (ids resolved). Objects that aren't modules pass
        through untouched; a module must be held by this manager, or the budget would be a lie.
        """
        use = self._enter(components)
        try:
            yield use.objects
        finally:
            self._exit(use)

    def _enter(self, components: Iterable[object]) -> _Use:
        with self._lock:
            use = self._resolve(components)
            for entry in use.entries:
                entry.refcount += 1
            try:
                if self._policy is not None:
                    self._place([e for e in use.entries if e.is_module and not e.resident])
            except BaseException:
                for entry in use.entries:
                    entry.refcount -= 1
                raise
            return use

    def _exit(self, use: _Use) -> None:
        with self._lock:
            now = time.monotonic()
            for entry in use.entries:
                entry.refcount -= 1
                self._tick += 1
                entry.last_used_tick, entry.last_used_at = self._tick, now

    def _resolve(self, components: Iterable[object]) -> _Use:
        use = _Use()
        seen: set[str] = set()
        for item in components:
            entry = self._resolve_one(item)
            use.objects.append(entry.component if entry is not None else item)
            if entry is not None and entry.id not in seen:  # listed twice still counts once
                seen.add(entry.id)
                use.entries.append(entry)
        return use

    def _resolve_one(self, item: object) -> _Entry | None:
        if isinstance(item, str):
            return self._entry(item)
        entry_id = self._by_object.get(id(item))
        if entry_id is not None:
            return self._entries[entry_id]
        if isinstance(item, torch.nn.Module):
            raise TypeError(
                f"ComponentsManager.using: a {type(item).__name__} that this manager doesn't hold; "
                "add() it first so its bytes count against the budget"
            )
        return None

    def _place(self, needed: list[_Entry]) -> None:
        """Put `needed` (already marked in use) on the device, offloading idle modules first."""
        if not needed:
            return
        strategy = self._policy.strategy if self._policy is not None else None
        if strategy is not None:
            for entry in needed:
                idle = [_Resident(e.id, e.component) for e in self._entries.values()
                        if e.resident and e.refcount == 0]
                for chosen in strategy(idle, entry.id, entry.component, self._policy.device):
                    self._offload(self._entries[chosen.model_id], EVICT)
        need = {entry.id: _module_bytes(entry.component) for entry in needed}
        room = self._room()
        shortfall = sum(need.values()) - room
        if shortfall > 0:
            idle = [
                EvictionCandidate(e.id, _module_bytes(e.component), e.last_used_tick)
                for e in self._entries.values()
                if e.resident and e.refcount == 0
            ]
            plan = plan_eviction(idle, math.ceil(shortfall))
            if plan is None:
                raise self._out_of_memory(need, room)
            for entry_id in plan:
                self._offload(self._entries[entry_id], EVICT)
        for entry in needed:
            self._load(entry, need)

    def _room(self) -> float:
        """Bytes that may still be placed on the device: budget and real free memory both bind."""
        policy = self._policy
        assert policy is not None
        room: float = math.inf
        if policy.budget is not None:
            room = policy.budget - policy.reserve - self.resident_bytes()
        if policy.free_memory_fn is not None:
            room = min(room, policy.free_memory_fn() - policy.reserve)
        return room

    def _load(self, entry: _Entry, need: dict[str, int]) -> None:
        policy = self._policy
        assert policy is not None
        try:
            self._move(entry, policy.device, LOAD, resident_after=True)
        except torch.OutOfMemoryError:
            # Our budget is an estimate; the allocator disagrees (fragmentation, another process,
            # activations). Give it everything we may and try once more.
            for other in list(self._entries.values()):
                if other.resident and other.refcount == 0:
                    self._offload(other, EVICT_AFTER_OOM)
            _empty_cache(policy.device)
            try:
                self._move(entry, policy.device, LOAD_RETRY, resident_after=True)
            except torch.OutOfMemoryError as exc:
                # Don't leave it half on the device.
                self._move(entry, policy.offload_device, ROLLBACK, resident_after=False)
                _empty_cache(policy.device)
                raise self._out_of_memory({entry.id: need[entry.id]}, self._room()) from exc

    def _offload(self, entry: _Entry, reason: str) -> None:
        policy = self._policy
        assert policy is not None
        self._move(entry, policy.offload_device, reason, resident_after=False)

    def _move(self, entry: _Entry, device: torch.device, reason: str, resident_after: bool) -> None:
        source = _device_of(entry.component)
        entry.component.to(device)  # in place: every pipeline holding the module sees it move
        entry.resident = resident_after
        self._log.append(
            OffloadRecord(
                time=time.time(),
                component_id=entry.id,
                from_device=str(source),
                to_device=str(device),
                bytes=_module_bytes(entry.component),
                reason=reason,
                resident_bytes=self.resident_bytes(),
            )
        )

    def _out_of_memory(self, need: dict[str, int], room: float) -> ComponentOutOfMemoryError:
        policy = self._policy
        assert policy is not None
        held = [
            (e.id, _module_bytes(e.component), e.refcount > 0)
            for e in self._entries.values()
            if e.resident
        ]
        wanted = ", ".join(f"{i} ({_format_bytes(b)})" for i, b in need.items())
        holding = ", ".join(
            f"{i} ({_format_bytes(b)}, {'in use' if busy else 'idle'})" for i, b, busy in held
        )
        budget = _format_bytes(policy.budget) if policy.budget is not None else "none"
        room_bytes = int(room) if math.isfinite(room) else -1
        message = (
            f"cannot place {wanted} on {policy.device}: budget {budget}, reserve "
            f"{_format_bytes(policy.reserve)}, room {_format_bytes(max(room_bytes, 0))} even "
            f"after offloading every idle component; held: {holding or 'nothing'}"
        )
        return ComponentOutOfMemoryError(message, dict(need), room_bytes, policy.budget, held)

    def _starts_resident(self, entry: _Entry) -> bool:
        policy = self._policy
        if policy is None or not entry.is_module:
            return False
        if _same_device(policy.device, policy.offload_device):
            return False  # on the home device, "already there" means "offloaded"
        where = _device_of(entry.component)
        return where is not None and _same_device(where, policy.device)


# ---------------------------------------------------------------------- identity


def _module_dtype(component: object) -> torch.dtype | None:
    if not isinstance(component, torch.nn.Module):
        return None
    for parameter in component.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def _structure_signature(component: object) -> str | None:
    """Class, config, and every tensor's name/dtype/shape: equal for identical weights, cheap.

    None when content can't identify the object: not a module, or a module without tensors
    (two such modules of one class are not interchangeable just because they hold nothing).
    """
    if not isinstance(component, torch.nn.Module):
        return None
    tensors = _state_tensors(component)
    if not tensors or any(t.is_meta for _, t in tensors):
        return None
    layout = [(name, str(t.dtype), list(t.shape)) for name, t in tensors]
    cls = type(component)
    return json.dumps(
        [f"{cls.__module__}.{cls.__qualname__}", _identity_config(component), layout],
        sort_keys=True,
        default=str,
    )


def _identity_config(module: torch.nn.Module) -> dict[str, Any]:
    """The module's config without where-it-came-from fields (`_name_or_path`, versions, dtype)."""
    config = getattr(module, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):  # transformers' PretrainedConfig
        as_dict = config.to_dict()
    elif isinstance(config, Mapping):  # diffusers' FrozenDict
        as_dict = dict(config)
    else:  # unknown: distinct per object, so never a false match
        return {"repr": repr(config)}
    ignored = {"transformers_version", "torch_dtype", "dtype"}
    return {k: v for k, v in as_dict.items() if not k.startswith("_") and k not in ignored}


def _content_digest(component: object) -> str:
    """sha256 over the structure signature and every tensor's raw bytes, in name order."""
    assert isinstance(component, torch.nn.Module)
    hasher = hashlib.sha256(str(_structure_signature(component)).encode())
    for name, tensor in _state_tensors(component):
        hasher.update(name.encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        hasher.update(raw.numpy().data)
    return hasher.hexdigest()


def _state_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    state = module.state_dict()
    return sorted((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------- bytes and devices


def _tensors(component: object) -> Iterator[torch.Tensor]:
    if isinstance(component, torch.nn.Module):
        yield from component.parameters()
        yield from component.buffers()


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _module_bytes(component: object) -> int:
    return sum(_tensor_bytes(t) for t in _tensors(component))


def _device_of(component: object) -> torch.device | None:
    return next((t.device for t in _tensors(component)), None)


def _normalize_device(device: torch.device) -> torch.device:
    # "cuda" and "cuda:0" are the same card when 0 is current; tensors always report an index.
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _same_placement(a: _OffloadPolicy, b: _OffloadPolicy) -> bool:
    return _same_device(a.device, b.device) and _same_device(a.offload_device, b.offload_device)


def _resolve_budget(memory_budget: float | None, device: torch.device) -> int | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int | float):
        raise TypeError(f"memory_budget must be bytes (int) or a fraction, got {memory_budget!r}")
    if isinstance(memory_budget, float):
        if not 0.0 < memory_budget <= 1.0:
            raise ValueError(
                f"memory_budget as a float is a fraction of device memory in (0, 1], got "
                f"{memory_budget}; pass bytes as an int"
            )
        return int(memory_budget * _device_total_memory(device))
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    return memory_budget


def _device_total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    raise ValueError(
        f"a fractional memory_budget needs a device that reports its total memory (cuda); "
        f"{device} doesn't: pass bytes as an int"
    )


def _cuda_free_memory_fn(device: torch.device) -> Callable[[], int]:
    def free_memory() -> int:
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but doesn't use are free for our next move too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

    return free_memory


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- text


def _compile_pattern(pattern: str) -> Callable[[set[str]], bool]:
    """`!`-negatable, `|`-separated fnmatch globs, matched against any of a set of keys."""
    negate = pattern.startswith("!")
    alternatives = (pattern[1:] if negate else pattern).split("|")
    if not pattern or any(not a for a in alternatives):
        raise ValueError(f"ComponentsManager.search: empty alternative in pattern {pattern!r}")

    def matches(keys: set[str]) -> bool:
        hit = any(fnmatch.fnmatchcase(k, a) for a in alternatives for k in keys)
        return hit != negate

    return matches


def _describe_filters(*values: str | None) -> str:
    names = ("component_id", "name", "collection", "load_id")
    given = [f"{n}={v!r}" for n, v in zip(names, values, strict=True) if v is not None]
    return ", ".join(given) or "no filters"


def _format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _summary_row(entry: _Entry, now: float) -> tuple[str, ...]:
    device, dtype = _device_of(entry.component), _module_dtype(entry.component)
    if entry.refcount:
        last_used = f"in use ({entry.refcount})"
    elif entry.last_used_at is None:
        last_used = "never"
    else:
        last_used = f"{now - entry.last_used_at:.1f}s ago"
    collections = ", ".join(sorted(entry.collections)) or "-"
    return (
        entry.id,
        type(entry.component).__name__,
        str(device) if device is not None else "-",
        str(dtype).removeprefix("torch.") if dtype is not None else "-",
        _format_bytes(_module_bytes(entry.component)) if entry.is_module else "-",
        collections,
        last_used,
    )
