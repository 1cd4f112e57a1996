"""The service's settings: one pydantic-settings model, read from `VLLTR_*` environment variables.

This class is the single source of truth: `vlltr serve` derives one command-line flag per field from it
(`service/cli.py`), and each field's description is that flag's help line. Nothing reads the environment
at import time; build a `Settings()` in an entry point or a test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vlltr.model.runtime.machine import usable_cpus

ENV_PREFIX = "VLLTR_"
MAX_BUCKET = 128


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/vlltr`, else `~/.cache/vlltr`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlltr"


class Settings(BaseSettings):
    """Everything `vlltr serve` can be told. Field names map to `VLLTR_<NAME>` and `--<name-with-dashes>`."""

    # Inputs are kept out of validation errors: a rejected value may be a token or a URL with a password.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", validate_default=True, hide_input_in_errors=True
    )

    # Model and network.
    bundle: Path | None = Field(
        None, description="model bundle directory; unset = the demo bundle (built under the cache dir on first use)"
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="ONNX Runtime provider: cuda (fail at start unless CUDA is really active), "
        "cpu, or auto (CUDA when it works, else CPU; the choice is logged and reported)",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads of the image encoder, per lane (0 = the usable cores shared "
        "among the lanes; with one lane on CPU, onnxruntime's default or one thread, whichever runs a lone "
        "image faster, timed at start; with --ort-spinning, onnxruntime's default)",
    )
    inference_lanes: int = Field(
        1,
        ge=1,
        description="batches the image encoder runs at once on CPU, each on its share of the cores (more "
        "throughput for a small model under load, a slower lone request); on CUDA always 1",
    )
    ort_spinning: bool = Field(
        False,
        description="let ONNX Runtime's intra-op threads spin between runs "
        "(a little faster on an otherwise idle machine; off, they "
        "leave the cores to image decoding and the event loop)",
    )
    head_threads: int = Field(
        1,
        ge=0,
        description="BLAS threads for the head's matrix products on the "
        "inference thread (0 = numpy's default, every core); 1 "
        "keeps them from fighting the encoder and decode threads "
        "for the cores",
    )
    head_shortlist: int = Field(
        256,
        ge=0,
        description="with more than --head-shortlist-from added classes, "
        "score exactly only this many added classes per image, those nearest by their "
        "anchors' mean; 0 = always score every class exactly",
    )
    head_shortlist_from: int = Field(4096, ge=0, description="added classes above which the shortlist is used")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(False, description="log every HTTP request (uvicorn access log)")

    # Processes.
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="HTTP front-end processes sharing the port, beside one engine process holding the model, "
        "the batcher and the class table (0 = one per 4 usable CPU cores, at least 1; 1 = a single process doing "
        "everything, with no engine or supervisor)",
    )
    shm_slots: int = Field(
        64,
        ge=1,
        le=4096,
        description="with several workers: images each front-end may have on their way to the engine at once, "
        "each a slot of shared memory holding its preprocessed pixels (raised to max_batch_files when lower)",
    )

    # Micro-batching.
    max_batch_size: int = Field(
        32,
        ge=1,
        le=MAX_BUCKET,
        description="most images per encoder run; batches are padded to power-of-two buckets up to this size",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0.0,
        le=10_000.0,
        description="a batch leaves when it is full, when its oldest image has waited this long, or at once "
        "when no other image is being decoded; never later (unless the encoder is still busy with the "
        "previous batch, then the moment it is done)",
    )
    queue_size: int = Field(
        512,
        ge=1,
        description="images allowed in flight (being decoded, waiting for "
        "or in the encoder); past it requests get 503 with "
        "Retry-After",
    )
    max_buffered_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="request-body bytes held in memory at once, summed over every request being read or "
        "answered; past it new uploads get 503 with Retry-After, and a single request larger than "
        "it gets 413",
    )
    preprocess_threads: int = Field(
        0,
        ge=0,
        description="threads decoding and resizing images in each process that decodes (0 = the usable cores, "
        "shared among the HTTP front-ends)",
    )
    jpeg_draft: Literal["bundle", "on", "off"] = Field(
        "bundle",
        description="decode large JPEGs at a reduced size (libjpeg's DCT scaling, keeping the shorter "
        "side at least twice the resize size): bundle = when the bundle's preprocessing "
        "says so (training evaluated that way, so serving stays exact), on = always "
        "(several times cheaper for big photos, but not the training evaluation's pixels "
        "for other bundles), off = never",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 answers")

    # Input limits.
    max_image_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="largest image upload in bytes (larger ones get 413)"
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="largest image in pixels, checked before decoding (decompression bombs get 413)"
    )
    max_batch_files: int = Field(64, ge=1, description="most images in one /v1/classify/batch request")
    max_top_k: int = Field(100, ge=1, description="largest top_k a request may ask for")

    # Slow clients and connections.
    body_read_timeout_s: float = Field(
        15.0,
        gt=0.0,
        le=3600.0,
        description="longest pause while a request body arrives (the clock restarts with every piece of "
        "it); past it the request is answered 408 and its connection closed",
    )
    header_read_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="most seconds a client may take to send a request's line and headers, counted from "
        "the connection's opening (or, on a kept-alive connection, from the request's first byte); past it "
        "the connection is closed, with a 408 when part of a request had arrived",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="most client connections one server process keeps open (idle kept-alive ones "
        "included); more are answered 503 with Retry-After and closed at once. At start the open-file "
        "limit is raised to fit (up to its hard limit); where it cannot be, this is lowered to what "
        "fits and the log says so",
    )

    # Classes added by text.
    admin_token: SecretStr | None = Field(
        None, description="Bearer token required to add or delete classes (unset = no token needed)"
    )
    max_descriptions: int = Field(256, ge=1, description="most descriptions for one added class")
    max_description_chars: int = Field(1000, ge=1, description="longest description, in characters after stripping")
    max_class_upload_bytes: int = Field(
        1024 * 1024, ge=1, description="largest class request body (JSON or text file), in bytes"
    )
    duplicate_threshold: float = Field(
        0.95,
        ge=-1.0,
        le=1.0,
        description="cosine between a new class's text embedding and an "
        "existing class's above which a near-duplicate "
        "warning is returned",
    )
    unknown_threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="threshold of the `unknown` verdict, on the score the bundle's rule names (`vision_energy` "
        "when the bundle has none): an image scoring below it is `unknown`. Unset: the "
        "threshold training fitted on validation data (manifest `calibration.unknown`); a bundle without one "
        "then gives no verdict (`unknown: null`)",
    )
    class_store: Path | None = Field(
        None,
        description="local class-store file (JSON lines, appended to) holding added classes when no Redis is set "
        "(default: <cache dir>/classes.jsonl; a file of the previous layout is migrated, its content kept as FILE.v1)",
    )
    sync_interval_s: float = Field(
        0.5,
        gt=0.0,
        le=60.0,
        description="how often the class-table version is checked against the store (pub/sub notifies sooner)",
    )

    # Classes added by text: safety, bulk adds and import (the store itself is `class_store` or Redis).
    allow_open_class_changes: bool = Field(
        False,
        description="start on a non-loopback --host without an admin token: anyone who can reach the port can "
        "add, delete, import and export classes (without this, such a start is refused; set VLLTR_ADMIN_TOKEN "
        "instead)",
    )
    max_bulk_classes: int = Field(1000, ge=1, description="most classes in one bulk add or import request")
    max_bulk_upload_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="largest bulk add or import request body, in bytes"
    )

    # Redis and caching.
    redis_url: str | None = Field(
        None, description="Redis URL (redis://host:port/db) for the embedding cache and the shared class store"
    )
    redis_prefix: str = Field(
        "vlltr",
        min_length=1,
        description="prefix of every Redis key and channel: the deployment's namespace (replicas with the same "
        "prefix share their added classes, whatever bundle each serves)",
    )
    redis_timeout_s: float = Field(
        0.25, gt=0.0, description="Redis socket timeout on the request path (the embedding cache)"
    )
    redis_store_timeout_s: float = Field(
        5.0,
        gt=0.0,
        description="Redis socket timeout for the class store (each class write waits for Redis's fsync)",
    )
    redis_retry_s: float = Field(
        1.0, gt=0.0, description="after a Redis error, seconds before it is tried again (requests skip it meanwhile)"
    )
    cache_size: int = Field(
        4096, ge=0, description="in-process embedding cache entries when no Redis is set (0 = no cache)"
    )
    cache_ttl_s: int = Field(86_400, ge=1, description="lifetime of a cached embedding in Redis")
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="where the demo bundle and the default class store live"
    )

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("host must not be empty")
        return value.strip()

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            # Name the scheme only: the rest of a URL may carry a password, and this message is printed.
            scheme = value.split("://", 1)[0] + "://" if "://" in value else "no scheme"
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {scheme}")
        return value

    @model_validator(mode="after")
    def _paths_absolute(self) -> Settings:
        self.cache_dir = self.cache_dir.expanduser()
        if self.bundle is not None:
            self.bundle = self.bundle.expanduser()
        return self

    @property
    def class_store_path(self) -> Path:
        """The local class-store file (used when `redis_url` is unset)."""
        return (self.class_store or self.cache_dir / "classes.jsonl").expanduser()

    @property
    def legacy_class_store_path(self) -> Path | None:
        """Where the previous version kept the default class store (migrated from when `class_store` is unset)."""
        return None if self.class_store is not None else self.cache_dir / "classes.json"

    @property
    def buckets(self) -> tuple[int, ...]:
        """Batch shapes the encoder ever sees: powers of two below `max_batch_size`, then it."""
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < self.max_batch_size]
        return tuple(sizes + [self.max_batch_size])

    @property
    def worker_count(self) -> int:
        """HTTP front-end processes to run (`workers`, or one per 4 usable cores when it is 0)."""
        return self.workers or max(1, usable_cpus() // 4)

    @property
    def decode_threads(self) -> int:
        """Size of each process's decode/preprocess pool: `preprocess_threads`, or the usable cores shared
        among the HTTP front-ends (one process: all of them). More threads than cores only queue on the same
        cores (and, in one process, on its interpreter lock)."""
        return self.preprocess_threads or max(1, usable_cpus() // self.worker_count)

    def encoder_threads(self, lanes: int) -> int | None:
        """Intra-op threads of the image encoder with `lanes` lanes: `intra_op_threads`, or the usable cores
        shared among the lanes; None for one lane (onnxruntime's default, or one thread where that is no
        slower: `vlltr.model.runtime.encoder_threads`, decided when the session is created)."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, usable_cpus() // lanes) if lanes > 1 else None


def env_name(field_name: str) -> str:
    """The environment variable of a settings field."""
    return f"{ENV_PREFIX}{field_name.upper()}"
