"""The exact-repeat result cache: the same job asked again gets the images it got before.

Generation is deterministic (the same model, inputs and seed make the same image, batched or
alone), so a repeated request need not run. `ResultCache` keys a job by its canonical inputs —
every field of the `GenerationJob` except how it is run and watched (id, listener, deadline,
cancellation), input images by the SHA-256 of their pixels — and stores its images' raw
pixels. Entries are dropped least recently used first to stay within `max_bytes`
(`BLOCKSERVE_RESULT_CACHE_BYTES`; 0 turns the cache off). A job with a field of a type it
cannot key runs as usual and is not stored.

A hit returns new `PIL.Image`s with the stored pixels: the response encodes them exactly as
it encodes a fresh result, so the bytes a client gets are the same. It reports no progress
(no partial images) and no queue time.

Not handled here: where jobs are submitted (`service.generation.submit` asks this cache first),
metrics (the caller's `on_lookup`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from PIL import Image

from service.jobs import GenerationJob, GenerationResult

# How a job is run and watched, not what it makes.
_NOT_INPUTS = frozenset({"listener", "wants_preview", "timeout_seconds", "id", "submitted",
                         "cancelled", "stop_reason"})


class _Unkeyable(Exception):
    """A value the cache can't put in a key."""


def _canonical(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Image.Image):
        return ("image", value.mode, value.size, hashlib.sha256(value.tobytes()).hexdigest())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _canonical(v)) for k, v in value.items())))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,
                tuple((f.name, _canonical(getattr(value, f.name)))
                      for f in dataclasses.fields(value)))
    raise _Unkeyable(type(value).__name__)


def job_key(job: GenerationJob) -> tuple[Any, ...] | None:
    """The job's canonical inputs, or None when one of them can't be keyed."""
    try:
        return tuple((f.name, _canonical(getattr(job, f.name)))
                     for f in dataclasses.fields(job) if f.name not in _NOT_INPUTS)
    except _Unkeyable:
        return None


@dataclasses.dataclass(frozen=True)
class _Stored:
    images: tuple[tuple[str, tuple[int, int], bytes], ...]  # (mode, size, pixels)
    seeds: tuple[int, ...]
    batch_size: int

    @property
    def nbytes(self) -> int:
        return sum(len(pixels) for _, _, pixels in self.images)


class ResultCache:
    """Results of finished jobs by canonical inputs, LRU within `max_bytes` (0: off).
    Thread-safe. `on_lookup(model, hit)` is told about each lookup."""

    def __init__(self, max_bytes: int,
                 on_lookup: Callable[[str, bool], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._on_lookup = on_lookup
        self._entries: OrderedDict[tuple[Any, ...], _Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, job: GenerationJob) -> GenerationResult | None:
        """The stored result of a job with `job`'s inputs, or None."""
        if not self.enabled:
            return None
        start = time.perf_counter()
        key = job_key(job)
        with self._lock:
            stored = None if key is None else self._entries.get(key)
            if stored is not None:
                self._entries.move_to_end(key)  # type: ignore[arg-type]
        if self._on_lookup is not None:
            self._on_lookup(job.model, stored is not None)
        if stored is None:
            return None
        images = [Image.frombytes(mode, size, pixels) for mode, size, pixels in stored.images]
        return GenerationResult(images, list(stored.seeds), time.perf_counter() - start,
                                stored.batch_size)

    def put(self, job: GenerationJob, result: GenerationResult) -> None:
        """Store `result` as `job`'s, dropping the least recently used entries past the
        bound (a result larger than the whole bound is not stored)."""
        if not self.enabled:
            return
        key = job_key(job)
        if key is None:
            return
        stored = _Stored(tuple((image.mode, image.size, image.tobytes())
                               for image in result.images),
                         tuple(result.seeds), result.batch_size)
        if stored.nbytes > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous.nbytes
            self._entries[key] = stored
            self._bytes += stored.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
