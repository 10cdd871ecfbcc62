"""Process-wide settings of the HTTP service, read from `BLOCKSERVE_*` environment variables.

Everything here is about the process (where to listen, who may call, how much to accept);
what each model serves and allows lives in the models file (`service.models_file`). Command
line flags override the environment (`Settings.from_env(port=...)`).

    BLOCKSERVE_HOST              127.0.0.1
    BLOCKSERVE_PORT              8000
    BLOCKSERVE_MODELS_FILE       the packaged service/models.yaml (the trained shapes model,
                                 then a random-weight tiny model)
    BLOCKSERVE_API_KEYS          comma-separated bearer keys; unset or empty = no auth (a value
                                 holding no key, such as " , ", is an error, not "no auth")
    BLOCKSERVE_PUBLIC_URL        the URL clients reach the service at (https://images.example);
                                 image URLs and job Locations start with it. Unset: the bound
                                 address when it is a specific one, else relative URLs. Never
                                 the request's Host header, which the client controls
    BLOCKSERVE_CACHE_DIR         ~/.cache/blockserve (tiny checkpoints are written here)
    BLOCKSERVE_MAX_BODY_BYTES    16 MiB; larger request bodies get 413 before being read
    BLOCKSERVE_FILE_TTL_SECONDS  3600; how long a `response_format=url` image is served
    BLOCKSERVE_FILE_STORE_BYTES  256 MiB; oldest url images are dropped past this
    BLOCKSERVE_QUEUE_SIZE        64; jobs waiting for the engine before 429 (with Retry-After)
    BLOCKSERVE_REQUEST_TIMEOUT_SECONDS  300; a job not done this long after it was submitted
                                 (queue time included) is cancelled: 504, or a failed job
    BLOCKSERVE_SCHEDULING        step; how requests share the denoiser: `step` (requests join
                                 and leave a running batch between denoising steps) or
                                 `request` (a batch runs from first step to last; for
                                 comparison); a model's `scheduling` in the models file
                                 overrides it
    BLOCKSERVE_MAX_BATCH_SIZE    8; most images per model forward (1 = no batching); a model's
                                 `max_batch_size` in the models file overrides it
    BLOCKSERVE_BATCH_WINDOW_MS   5; request scheduling only: how long an idle engine waits for
                                 compatible requests to join the first one's batch
    BLOCKSERVE_WORKERS           1; steps the engine computes at once. Keep 1 for one GPU; on
                                 a CPU, a small model may serve more with one worker per core
                                 (each gets cores / workers torch threads)
    BLOCKSERVE_TORCH_THREADS     torch threads per worker; default OMP_NUM_THREADS when set,
                                 else (cores - 1) / workers: one core stays free, so a busy
                                 machine does not stall every op (`service.torch_threads`)
    BLOCKSERVE_RESULT_CACHE_BYTES  0 (off); pixels of finished jobs kept to answer an exact
                                 repeat (same model, inputs and seed) without running it,
                                 least recently used dropped first (`service.result_cache`)
    BLOCKSERVE_JOB_TTL_SECONDS   600; how long a finished /v1/jobs job stays readable
    BLOCKSERVE_MAX_FINISHED_JOBS 256; finished jobs kept at most (the oldest are forgotten)
    BLOCKSERVE_JOB_STORE_BYTES   128 MiB; bytes of finished jobs' results kept at most (the
                                 oldest are forgotten first)
    BLOCKSERVE_MAX_DECODE_BYTES  512 MiB; memory that input images being decoded may take at
                                 once (estimated from their headers); past it, 429
    BLOCKSERVE_MAX_DECODES       4; input images decoded at once; past it, 429
    BLOCKSERVE_READ_TIMEOUT_SECONDS  30; how long a client may take to send a request's
                                 headers, and then its body (408): slow clients can't hold
                                 connections open
    BLOCKSERVE_KEEP_ALIVE_SECONDS  5; an idle keep-alive connection is closed after this
    BLOCKSERVE_MAX_CONNECTIONS   512; open connections (and requests in progress) at most;
                                 past it, new requests get 503
    BLOCKSERVE_TEST_HOOKS        false; tests only: prompt markers that fail or slow a job
                                 inside the pipeline (`service.fault_injection`)
    BLOCKSERVE_LOG_LEVEL         info

Not handled here: TLS (put a proxy in front), per-key quotas, rate limits. In Ray mode the
header read timeout and connection cap are Ray Serve's proxy's (see the README).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.yaml")
ENV_PREFIX = "BLOCKSERVE_"


class SettingsError(ValueError):
    """A setting is invalid; the message names the environment variable."""


class Settings(BaseModel):
    """The service's settings. Each field maps to `BLOCKSERVE_<FIELD NAME IN CAPITALS>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    models_file: Path = Field(DEFAULT_MODELS_FILE, description="YAML file of served models.")
    api_keys: tuple[str, ...] = Field(
        (), description="Bearer keys accepted on /v1/*; empty means no authentication."
    )
    public_url: str | None = Field(
        None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Base URL clients reach the service at; image URLs and job Locations "
                    "start with it. Unset: the bound address, or relative URLs.",
    )
    cache_dir: Path = Field(
        Path("~/.cache/blockserve").expanduser(), description="Where tiny checkpoints go."
    )
    max_body_bytes: int = Field(
        16 * 2**20, ge=1024, le=2**31, description="Largest request body accepted (bytes)."
    )
    file_ttl_seconds: float = Field(
        3600.0, gt=0, le=7 * 24 * 3600, description="How long a url-format image is served."
    )
    file_store_bytes: int = Field(
        256 * 2**20, ge=2**20, description="Memory held for url-format images (bytes)."
    )
    queue_size: int = Field(64, ge=1, le=100_000, description="Jobs waiting before 429.")
    request_timeout_seconds: float = Field(
        300.0, gt=0, le=24 * 3600,
        description="Longest a job may take from submission (queue included) before 504.",
    )
    scheduling: Literal["step", "request"] = Field(
        "step", description="`step`: requests share the denoiser's forwards and join or leave "
                            "between steps; `request`: a batch runs whole (for comparison).",
    )
    max_batch_size: int = Field(
        8, ge=1, le=256, description="Most images per model forward; 1 turns batching off."
    )
    workers: int = Field(
        1, ge=1, le=64,
        description="Steps the engine computes at once; on a CPU each gets cores/workers "
                    "torch threads. 1 for one GPU.",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024,
        description="Torch intra-op threads per worker; None: OMP_NUM_THREADS if set, else "
                    "(cores - 1) / workers (service.torch_threads says why).",
    )
    batch_window_ms: float = Field(
        5.0, ge=0, le=10_000,
        description="Request scheduling only: how long an idle engine waits for compatible "
                    "requests to batch with.",
    )
    result_cache_bytes: int = Field(
        0, ge=0, le=2**40,
        description="Pixels of finished jobs kept for exact repeats (bytes); 0 turns it off.",
    )
    job_ttl_seconds: float = Field(
        600.0, gt=0, le=7 * 24 * 3600, description="How long a finished job stays readable."
    )
    max_finished_jobs: int = Field(
        256, ge=1, le=100_000, description="Finished jobs kept at most (oldest forgotten)."
    )
    job_store_bytes: int = Field(
        128 * 2**20, ge=2**20, description="Bytes of finished jobs' results kept at most."
    )
    max_decode_bytes: int = Field(
        512 * 2**20, ge=2**20,
        description="Memory input images being decoded may take at once; past it, 429.",
    )
    max_decodes: int = Field(4, ge=1, le=1024,
                             description="Input images decoded at once; past it, 429.")
    read_timeout_seconds: float = Field(
        30.0, gt=0, le=3600,
        description="How long a client may take to send a request's headers, then its body.",
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, le=3600, description="An idle keep-alive connection is closed after this."
    )
    max_connections: int = Field(
        512, ge=1, le=100_000,
        description="Open connections (and requests in progress) at most; past it, 503.",
    )
    test_hooks: bool = Field(
        False, description="Tests only: prompt markers that fail or slow a job in the pipeline."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return ()  # unset or empty: authentication off, as documented
            keys = tuple(key.strip() for key in value.split(",") if key.strip())
            if not keys:
                # " , ": a typo must not silently turn authentication off.
                raise ValueError(f"{value!r} holds no key; give one or more comma-separated "
                                 "keys, or leave it empty to turn authentication off")
            return keys
        return value

    @field_validator("public_url", mode="after")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    def base_url(self) -> str:
        """What returned URLs start with: the public URL, else the bound address when it is a
        specific one, else "" (relative URLs). Never taken from a request's Host header."""
        if self.public_url:
            return self.public_url
        if self.host in ("0.0.0.0", "::", ""):
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @field_validator("models_file", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `BLOCKSERVE_*` variables, then `overrides` (None values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and (raw.strip() or name == "api_keys"):
                values[name] = raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as error:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                for e in error.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None
