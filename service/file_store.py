"""Short-lived storage for `response_format=url` images, served by `GET /v1/files/{id}`.

In memory, per process: an id is 128 random bits (unguessable), an entry expires after the
TTL, and when the store would exceed its byte budget the oldest entries are dropped first.
Not handled: persistence across restarts, sharing between processes or replicas (put a real
object store behind the same interface for that).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    media_type: str
    expires_at: float


class FileStore:
    """Bytes by random id, with a TTL and a total byte budget. Thread-safe."""

    def __init__(self, ttl_seconds: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        self._clock = clock
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        file_id = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            while self._files and self._bytes + len(data) > self.max_bytes:
                _, dropped = self._files.popitem(last=False)
                self._bytes -= len(dropped.data)
            self._files[file_id] = StoredFile(data, media_type, self._clock() + self.ttl_seconds)
            self._bytes += len(data)
        return file_id

    def get(self, file_id: str) -> StoredFile | None:
        with self._lock:
            self._expire()
            return self._files.get(file_id)

    def _expire(self) -> None:
        now = self._clock()
        while self._files:
            file_id, stored = next(iter(self._files.items()))
            if stored.expires_at > now:
                return
            del self._files[file_id]
            self._bytes -= len(stored.data)
