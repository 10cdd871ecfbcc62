"""What the hostile tests of both modes share (`test_hostile.py`, and the Ray-mode subset in
`test_ray_cli.py`): payloads an attacker sends, and reading the request counters."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Protocol

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

BIG = "9" * 5000  # an integer literal longer than Python converts (4300 digits)


class Server(Protocol):
    base_url: str


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("blockserve_http_requests_total", "blockserve_requests_total"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def counted(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (a status may be "4xx")."""
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        found = dict(sample_labels)
        if sample_name != name:
            continue
        if all(found.get(k) == v or (v.endswith("xx") and found.get(k, "").startswith(v[0]))
               for k, v in labels.items()):
            total += value
    return total


def png(size: tuple[int, int] = (32, 32), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, bit_depth: int = 8, colour: int = 0,
                 rows: bytes | None = None) -> bytes:
    """A PNG whose header says width x height; its pixels are zeros (compress to little)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = b"\0" + bytes(width * channels * bit_depth // 8)
    squeeze = zlib.compressobj(9)
    data = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush() \
        if rows is None else rows
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))
