"""The shared weight pool of distributed mode: one copy of each unique component's weights
per node, in Ray's object store, that every replica builds its modules from.

    ComponentRegistry   a named Ray actor: which components exist, where their bytes are,
                        who holds them on which device; loads a component at most once
    PooledWeights       the replica's side: builds modules from the pool (zero-copy on the
                        CPU), offloads idle ones, reports what it holds

How a component gets into the pool: a replica asks `acquire(key)` (key = checkpoint path,
component, dtype). A known key is a *hit*. An unknown key whose component folder is
byte-identical to a pooled one (`weight_arena.folder_digest`) joins that entry: still a hit,
and nothing is loaded — two models with the same VAE share one entry. Otherwise it is a
*miss*: a one-shot Ray task (`max_calls=1`, so its process and its private copy exit with it)
loads the component exactly as `ModularPipeline.load_components` does and packs it into a
skeleton and an arena (`weight_arena.pack_module`); the arena is a task return, so the
registry owns it and it stays in the object store as long as the registry lives. Ray keeps
one copy per node: the first replica on another node pulls it there, the rest map that copy.

Offload: a replica drops a component's tensors (to the meta device) after `idle_offload_s`
unused, or when its `memory_budget_bytes` needs the room (the smallest set of idle
components, `blocks.eviction.plan_eviction`); the next use acquires it again — a
pool hit, never a disk read.

Adapters: a LoRA file a model allows (its models file's `loras`) is a pool entry too
(`AdapterKey`, the file's tensors packed as an `AdapterTensors` module): a TextEncoder or
Denoiser replica that needs it takes a `blocks.lora.LoraFile` whose tensors are views of the
node's copy (`PooledWeights.adapter_file`), so the replicas of a node share one copy. It stays
held until the replica's LoRA cache unloads it (`drop_adapter`); idle offload and the memory
budget leave adapters alone (their layers keep the tensors). The replica's adapter loads and
evictions ride its heartbeat too (`deployments.lora_events`): the registry sums them for the
router's `/metrics`.

Failures: a replica's death loses nothing of the pool (the registry owns the bytes); its
residency expires after three missed heartbeats. The registry restarts itself
(`max_restarts=-1`; calls in flight are retried): its bookkeeping comes back from the
replicas' next heartbeats, which report what they hold; the object-store copies died with the
old process, so the first acquire of each component after a restart loads it once more.
Modules already built keep working — a mapped arena stays valid while a replica uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

import blocks.batch_invariance  # noqa: F401  before any load: models keep its rerouted functions
from blocks import ModularPipeline
from blocks.dtypes import DTYPES
from blocks.eviction import EvictionCandidate, plan_eviction
from blocks.lora import LoraFile, read_lora_file
from deployments.lora_events import LoraEventCounts, LoraEventRow, LoraEventTotals
from deployments.weight_arena import (
    PackedModule,
    assign_tensors,
    folder_digest,
    pack_module,
    release_tensors,
)

logger = logging.getLogger(__name__)

REGISTRY_NAME = "blockserve-component-registry"
REGISTRY_NAMESPACE = "blockserve"
MISSED_HEARTBEATS = 3  # a replica silent this many heartbeats is gone


@dataclass(frozen=True)
class ComponentKey:
    """A component as a model names it: checkpoint, component (subfolder) and dtype."""

    path: str
    component: str
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return f"{Path(self.path).name}/{self.component}:{self.dtype}"

    def digest(self) -> str | None:
        return folder_digest(Path(self.path) / self.component)

    def load(self) -> tuple[Any, Any]:
        """The one-shot load task's (packed, arena) references."""
        return _load_component.remote(self.path, self.component, self.dtype)


@dataclass(frozen=True)
class AdapterKey:
    """A LoRA adapter file: its source (file, folder or Hub id) and file name in a folder."""

    source: str
    weight_name: str | None = None
    component = "lora"

    @property
    def label(self) -> str:
        return f"lora:{self.source}" + (f"/{self.weight_name}" if self.weight_name else "")

    def digest(self) -> str | None:
        return None  # one entry per source: models naming the same file share it

    def load(self) -> tuple[Any, Any]:
        return _load_adapter.remote(self.source, self.weight_name)


class AdapterTensors(torch.nn.Module):
    """A LoRA file in the pool's form: its tensors as buffers (so it packs like any
    component), its key names and diffusers' metadata on the skeleton."""

    def __init__(self, file: LoraFile) -> None:
        super().__init__()
        self.names = list(file.tensors)
        self.metadata = file.metadata
        self.source = file.source
        for index, tensor in enumerate(file.tensors.values()):
            self.register_buffer(f"t{index}", tensor)

    def file(self) -> LoraFile:
        tensors = {name: getattr(self, f"t{index}") for index, name in enumerate(self.names)}
        return LoraFile(tensors, self.metadata, self.source)


@dataclass(frozen=True)
class Lease:
    """What `acquire` returns: the entry, its skeleton and slots, and the arena's reference
    (in a list, so Ray hands the reference over instead of resolving it)."""

    entry_id: str
    packed: PackedModule
    arena: list[Any]


@dataclass
class _Entry:
    entry_id: str
    packed: PackedModule
    arena_ref: Any
    keys: set[ComponentKey | AdapterKey]
    users: set[tuple[str, str]] = field(default_factory=set)  # (model, component)


@dataclass
class _Replica:
    node: str
    seen: float
    resident: dict[str, dict[str, int]]  # entry id -> {device: bytes}
    offloads: int = 0


@ray.remote(num_cpus=0, max_calls=1, num_returns=2)
def _load_component(path: str, component: str, dtype: str) -> tuple[PackedModule, Any]:
    """Load one component from its checkpoint, as a replica would, and pack it. Runs in a
    process of its own that exits afterwards, so no private copy outlives the load."""
    pipe = ModularPipeline.from_pretrained(path)
    pipe.load_components(names=[component], dtype=DTYPES[dtype], strict=True)
    return pack_module(pipe.components[component])


@ray.remote(num_cpus=0, max_calls=1, num_returns=2)
def _load_adapter(source: str, weight_name: str | None) -> tuple[PackedModule, Any]:
    """Read one LoRA file and pack its tensors as they are (each replica's layers cast them
    to their model's dtype, as in embedded mode)."""
    return pack_module(AdapterTensors(read_lora_file(source, weight_name)))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ComponentRegistry:
    """The pool's index: entries, who holds them where, and hit/miss/load counts."""

    def __init__(self, heartbeat_s: float = 2.0) -> None:
        self.heartbeat_s = heartbeat_s
        self._entries: dict[str, _Entry] = {}
        self._keys: dict[ComponentKey | AdapterKey, str] = {}
        self._replicas: dict[str, _Replica] = {}
        self._departed_offloads = 0
        self._lora_events = LoraEventTotals()
        self._load_lock = asyncio.Lock()
        self.hits = self.misses = self.loads = 0
        self.loading = 0  # loads in flight: a miss counts before its load finishes
        self.started = time.time()

    async def acquire(self, key: ComponentKey | AdapterKey, model: str = "",
                      user: str | None = None) -> Lease:
        """`key`'s entry, loaded first if needed; `model` uses it as `user` (default: the
        key's component)."""
        entry = self._entries.get(self._keys.get(key, ""))
        if entry is None:
            async with self._load_lock:  # one load at a time: a twin never loads twice
                entry = await self._find_or_load(key)
        else:
            self.hits += 1
        entry.users.add((model, user or key.component))
        return Lease(entry.entry_id, entry.packed, [entry.arena_ref])

    async def _find_or_load(self, key: ComponentKey | AdapterKey) -> _Entry:
        entry = self._entries.get(self._keys.get(key, ""))
        if entry is not None:  # loaded while we waited for the lock
            self.hits += 1
            return entry
        digest = await asyncio.to_thread(key.digest)
        entry_id = f"{digest[:16]}:{key.dtype}" if digest else key.label  # type: ignore[union-attr]
        entry = self._entries.get(entry_id)
        if entry is not None:  # byte-identical to a pooled component: share it
            self.hits += 1
        else:
            self.misses += 1
            self.loading += 1
            try:
                packed_ref, arena_ref = key.load()
                entry = _Entry(entry_id, await packed_ref, arena_ref, set())
            finally:
                self.loading -= 1
            self._entries[entry_id] = entry
            self.loads += 1
            logger.info("pool: loaded %s as %s (%d bytes)", key.label, entry_id,
                        entry.packed.arena_bytes)
        entry.keys.add(key)
        self._keys[key] = entry_id
        return entry

    def report(self, replica: str, node: str, resident: dict[str, dict[str, int]],
               offloads: int, lora_events: list[LoraEventRow] | None = None) -> None:
        """A replica's heartbeat: what it holds now, its offloads and adapter loads and
        evictions so far."""
        self._replicas[replica] = _Replica(node, time.monotonic(), resident, offloads)
        if lora_events is not None:
            self._lora_events.report(replica, lora_events)

    def lora_events(self) -> list[LoraEventRow]:
        """(event, model, lora, count): adapter loads and evictions of every replica since
        the registry started (`deployments.lora_events`)."""
        return self._lora_events.rows()

    def forget(self, replica: str) -> None:
        """A replica shutting down cleanly."""
        gone = self._replicas.pop(replica, None)
        if gone is not None:
            self._departed_offloads += gone.offloads

    def _expire(self) -> None:
        limit = time.monotonic() - MISSED_HEARTBEATS * self.heartbeat_s
        for replica in [r for r, state in self._replicas.items() if state.seen < limit]:
            self.forget(replica)

    def stats(self) -> dict[str, Any]:
        """Everything the metrics and `GET /v1/models/{id}` show, as plain data."""
        self._expire()
        refs = [entry.arena_ref for entry in self._entries.values()]
        try:
            locations = ray.experimental.get_object_locations(refs, timeout_ms=2000)
        except Exception:  # the pool still answers without locations
            locations = {}
        pool_bytes: dict[str, int] = {}
        entries = []
        for entry in self._entries.values():
            nodes = (locations.get(entry.arena_ref) or {}).get("node_ids") or []
            for node in nodes:
                pool_bytes[node] = pool_bytes.get(node, 0) + entry.packed.arena_bytes
            entries.append({
                "entry": entry.entry_id,
                "keys": sorted(key.label for key in entry.keys),
                "users": sorted(f"{model}/{component}" for model, component in entry.users),
                "bytes": entry.packed.arena_bytes,
                "nodes": sorted(nodes),
                "resident": {replica: state.resident[entry.entry_id]
                             for replica, state in sorted(self._replicas.items())
                             if entry.entry_id in state.resident},
            })
        return {
            "entries": entries,
            "pool_bytes_by_node": pool_bytes,
            "replicas": {replica: {"node": state.node, "resident": state.resident,
                                   "offloads": state.offloads}
                         for replica, state in sorted(self._replicas.items())},
            "hits": self.hits, "misses": self.misses, "loads": self.loads,
            "loading": self.loading,
            "offloads": self._departed_offloads + sum(r.offloads
                                                      for r in self._replicas.values()),
            "started": self.started,
        }


def get_registry(heartbeat_s: float = 2.0) -> Any:
    """The cluster's registry, created on first use. Detached: it must outlive whichever
    replica happened to create it; `shutdown_registry` (or the cluster's end) removes it."""
    return ComponentRegistry.options(
        name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True,
        lifetime="detached",
    ).remote(heartbeat_s)


def registry_stats(timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The registry's `stats()`, or None when there is none (yet) or it doesn't answer."""
    return _ask_registry("stats", timeout_s)


def registry_lora_events(timeout_s: float = 2.0) -> list[LoraEventRow] | None:
    """The registry's `lora_events()`, or None when there is none (yet) or it doesn't answer."""
    return _ask_registry("lora_events", timeout_s)


def _ask_registry(method: str, timeout_s: float) -> Any:
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
        return ray.get(getattr(registry, method).remote(), timeout=timeout_s)
    except Exception:
        return None


def shutdown_registry() -> None:
    """Kill the registry (and with it the pool's object-store copies), if there is one."""
    with contextlib.suppress(Exception):
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE), no_restart=True)


@dataclass
class _Pooled:
    key: ComponentKey
    model: str
    device: torch.device
    module: torch.nn.Module
    entry_id: str
    packed: PackedModule
    resident: bool = True
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    tick: int = 0


class PooledWeights:
    """A replica's modules, built from the pool; idle ones offloaded, use brings them back.

    `idle_offload_s`: drop a component unused this long (None: never). `memory_budget_bytes`:
    weight bytes this replica may hold resident (None: no limit). Each component runs on the
    device its model names ("cpu": the pool's pages themselves, no copy).
    """

    def __init__(self, registry: Any, replica: str, idle_offload_s: float | None = None,
                 memory_budget_bytes: int | None = None, heartbeat_s: float = 2.0) -> None:
        self.registry = registry
        self.replica = replica
        self.idle_offload_s = idle_offload_s
        self.memory_budget_bytes = memory_budget_bytes
        self.heartbeat_s = heartbeat_s
        self.node = ray.get_runtime_context().get_node_id()
        self.offloads = 0
        # The observer of this replica's LoRA caches; a load or eviction is reported at once.
        self.lora_events = LoraEventCounts(on_change=self.report)
        self._components: dict[tuple[str, str], _Pooled] = {}
        self._adapters: dict[tuple[str, str], tuple[str, int]] = {}  # (model, name) -> entry
        self._lock = threading.RLock()
        self._tick = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._housekeeping, daemon=True,
                                        name="weight-pool")
        self._thread.start()

    # Loading ---------------------------------------------------------------------------------

    def load(self, model: str, path: str, component: str, dtype: str = "float32",
             device: str = "cpu") -> torch.nn.Module:
        """`model`'s `component` on `device`, built from the pool (loaded into it first if it
        isn't)."""
        key = ComponentKey(str(path), component, dtype)
        lease: Lease = ray.get(self.registry.acquire.remote(key, model))
        with self._lock:
            twin = next((p for p in self._components.values()
                         if p.entry_id == lease.entry_id and p.device == torch.device(device)),
                        None)
            if twin is not None:  # the same weights under another name: one module here too
                self._components[(model, component)] = twin
                return twin.module
        module = lease.packed.build()
        pooled = _Pooled(key, model, torch.device(device), module, lease.entry_id, lease.packed,
                         resident=False)
        with self._lock:
            self._make_room(lease.packed.arena_bytes)
            self._assign(pooled, lease)
            self._components[(model, component)] = pooled
        self.report()
        return module

    def _assign(self, pooled: _Pooled, lease: Lease) -> None:
        arena = ray.get(lease.arena[0])  # on this node: a read-only view of the store's pages
        assign_tensors(pooled.module, pooled.packed.slots, arena, pooled.device)
        pooled.entry_id, pooled.packed, pooled.resident = lease.entry_id, lease.packed, True

    def adapter_file(self, model: str, name: str, source: str,
                     weight_name: str | None = None) -> LoraFile:
        """`model`'s adapter `name` (its file `source`, `weight_name`) with its tensors
        viewing the node's pooled copy (read into the pool first if it isn't there). Held
        until `drop_adapter`: the adapter's layers keep the tensors, so it is never offloaded."""
        key = AdapterKey(str(source), weight_name)
        lease: Lease = ray.get(self.registry.acquire.remote(key, model, f"lora/{name}"))
        bundle = lease.packed.build()
        assign_tensors(bundle, lease.packed.slots, ray.get(lease.arena[0]), "cpu")
        with self._lock:
            self._adapters[(model, name)] = (lease.entry_id, lease.packed.arena_bytes)
        self.report()
        return bundle.file()  # type: ignore[operator]

    def drop_adapter(self, model: str, name: str) -> None:
        """`model`'s adapter `name` was unloaded: this replica no longer holds its tensors."""
        with self._lock:
            dropped = self._adapters.pop((model, name), None)
        if dropped is not None:
            self.report()

    # Use -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, model: str, components: Iterable[str]) -> Iterator[None]:
        """Hold `model`'s pooled `components` (others are ignored) resident while in use."""
        with self._lock:
            held = [self._components[(model, name)] for name in components
                    if (model, name) in self._components]
            for pooled in held:
                pooled.in_use += 1
            try:
                missing = [pooled for pooled in held if not pooled.resident]
                if missing:
                    self._make_room(sum(p.packed.arena_bytes for p in missing))
                    for pooled in missing:
                        lease = ray.get(self.registry.acquire.remote(pooled.key, model))
                        self._assign(pooled, lease)
            except BaseException:
                for pooled in held:
                    pooled.in_use -= 1
                raise
        if missing:
            self.report()
        try:
            yield
        finally:
            with self._lock:
                for pooled in held:
                    pooled.in_use -= 1
                    self._tick += 1
                    pooled.last_used, pooled.tick = time.monotonic(), self._tick

    def _make_room(self, need: int) -> None:
        if self.memory_budget_bytes is None:
            return
        shortfall = self.resident_bytes() + need - self.memory_budget_bytes
        if shortfall <= 0:
            return
        idle = {p.entry_id: p for p in self._unique() if p.resident and p.in_use == 0}
        plan = plan_eviction([EvictionCandidate(name, p.packed.arena_bytes, p.tick)
                              for name, p in idle.items()], shortfall)
        if plan is None:
            held = ", ".join(f"{m}/{c} ({p.packed.arena_bytes} B, "
                             f"{'in use' if p.in_use else 'idle'})"
                             for (m, c), p in self._components.items() if p.resident)
            raise MemoryError(
                f"weight pool: {need} bytes needed but the replica's "
                f"memory_budget_bytes is {self.memory_budget_bytes} and offloading every idle "
                f"component frees too little; resident: {held or 'nothing'}")
        for name in plan:
            self._offload(idle[name], "budget")

    # Offload ---------------------------------------------------------------------------------

    def _offload(self, pooled: _Pooled, reason: str) -> None:
        release_tensors(pooled.module, pooled.packed.slots)
        pooled.resident = False
        self.offloads += 1
        logger.info("pool: offloaded %s/%s (%s)", pooled.model, pooled.key.component, reason)

    def offload_idle(self, now: float | None = None) -> int:
        """Offload what has been idle for `idle_offload_s`; the number offloaded."""
        if self.idle_offload_s is None:
            return 0
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [p for p in self._unique()
                     if p.resident and p.in_use == 0
                     and now - p.last_used >= self.idle_offload_s]
            for pooled in stale:
                self._offload(pooled, "idle")
        if stale:
            self.report()
        return len(stale)

    # Reporting -------------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        return sum(p.packed.arena_bytes for p in self._unique() if p.resident)

    def _unique(self) -> list[_Pooled]:
        """Each pooled module once (twins are listed under every model that uses them)."""
        return list({id(p): p for p in self._components.values()}.values())

    def residency(self) -> dict[str, dict[str, int]]:
        """{entry id: {device: bytes}} of what this replica holds now."""
        with self._lock:
            held: dict[str, dict[str, int]] = {}
            for pooled in self._unique():
                if pooled.resident:
                    held.setdefault(pooled.entry_id, {})[str(pooled.device)] = (
                        pooled.packed.arena_bytes)
            for entry_id, size in self._adapters.values():
                held.setdefault(entry_id, {})["cpu"] = size
            return held

    def describe(self) -> dict[str, Any]:
        """{model/component: {entry, resident, bytes, idle_s}} for `info()`."""
        now = time.monotonic()
        with self._lock:
            described = {f"{m}/{c}": {"entry": p.entry_id, "resident": p.resident,
                                      "bytes": p.packed.arena_bytes, "in_use": p.in_use,
                                      "idle_s": round(now - p.last_used, 3)}
                         for (m, c), p in self._components.items()}
            described.update({f"{m}/lora/{n}": {"entry": entry_id, "resident": True,
                                                "bytes": size}
                              for (m, n), (entry_id, size) in self._adapters.items()})
            return described

    def report(self) -> None:
        """Tell the registry what this replica holds (also every heartbeat)."""
        try:
            self.registry.report.remote(self.replica, self.node, self.residency(),
                                        self.offloads, self.lora_events.rows())
        except Exception:  # the registry restarting: the next heartbeat reports again
            logger.debug("pool: report failed", exc_info=True)

    def _housekeeping(self) -> None:
        interval = self.heartbeat_s
        if self.idle_offload_s is not None:
            interval = min(interval, max(self.idle_offload_s / 4, 0.05))
        last_report = time.monotonic()
        while not self._stop.wait(interval):
            try:
                if self.offload_idle():  # reports what it dropped
                    last_report = time.monotonic()
                elif time.monotonic() - last_report >= self.heartbeat_s:
                    self.report()
                    last_report = time.monotonic()
            except Exception:
                logger.exception("pool: housekeeping failed")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.registry.forget.remote(self.replica)
