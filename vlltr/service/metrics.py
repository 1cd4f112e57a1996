"""Prometheus metrics of the service.

The names are a contract with the deployment's dashboards and alert rules (`deploy/`): change them there too.
Each app gets its own `CollectorRegistry`, so several apps in one process (tests) never collide.

In the multi-process service (`vlltr serve --workers N`, `vlltr.service.workers`) every process writes its
values to files in the directory `PROMETHEUS_MULTIPROC_DIR` names (prometheus-client's multiprocess mode, set
by the supervisor before any worker starts) and `/metrics`, whichever front-end answers it, reads them all:
counters and histograms are summed over every process, including those that died and were restarted; each
gauge says how it combines (`multiprocess_mode`): counts of live things are summed over the live processes,
the class table's gauges (set by the engine alone) take the live maximum, `vlltr_redis_up` the live minimum.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TIERS = ("head", "medium", "tail", "added")
REJECT_REASONS = (
    "queue_full",
    "too_large",
    "bad_image",
    "unsupported_type",
    "invalid",
    "unauthorized",
    "forbidden",
    "timeout",
)
READ_STAGES = ("head", "body")
CACHE_RESULTS = ("hit", "miss", "error")
CLASS_RECORD_STATES = ("served", "promoted", "quarantined")
RELOAD_REASONS = ("epoch", "rollback", "history", "reconnect", "forced")


class Metrics:
    """The service's metric objects, registered in a private registry."""

    def __init__(self, *, redis_enabled: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_ENV) or None
        r = self.registry
        self.request_duration = Histogram(
            "vlltr_request_duration_seconds",
            "HTTP request latency, by route template, method and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vlltr_queue_wait_seconds",
            "time an image waited for its encoder batch",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "vlltr_preprocess_duration_seconds",
            "decode and preprocessing time per image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "vlltr_inference_duration_seconds", "encoder plus head time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "vlltr_batch_size", "images per batch (before padding to a bucket)", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "vlltr_queue_depth", "images waiting for the encoder", multiprocess_mode="livesum", registry=r
        )
        self.queue_capacity = Gauge(
            "vlltr_queue_capacity", "images allowed to wait for the encoder", multiprocess_mode="livemax", registry=r
        )
        self.cache_lookups = Counter(
            "vlltr_cache_lookups", "embedding cache look-ups by result", ["result"], registry=r
        )
        self.rejected = Counter("vlltr_requests_rejected", "requests refused, by reason", ["reason"], registry=r)
        self.classes = Gauge(
            "vlltr_classes",
            "classes in the served table, by source",
            ["source"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.predictions = Counter(
            "vlltr_predictions", "top-1 predictions by the long-tail tier of the class", ["tier"], registry=r
        )
        # The HTTP server's connections (vlltr.service.connections) and slow clients (vlltr.service.body_timeout).
        self.requests_in_progress = Gauge(
            "vlltr_http_requests_in_progress",
            "HTTP requests inside the app (their body being read, or their answer being made)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections = Gauge(
            "vlltr_http_connections",
            "client connections open in this server process",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections_limit = Gauge(
            "vlltr_http_connections_limit",
            "most client connections this server process keeps open; more are answered 503 and closed",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections_refused = Counter(
            "vlltr_http_connections_refused",
            "client connections refused at the connection limit (answered 503 and closed)",
            registry=r,
        )
        self.read_timeouts = Counter(
            "vlltr_http_read_timeouts",
            "requests dropped because the client paused too long, by what it was sending (head or body)",
            ["stage"],
            registry=r,
        )
        # prometheus-client's Info has no multiprocess mode; a gauge at 1 labelled the same way is what Info
        # writes in the text format anyway (`vlltr_model_info{bundle_id=...} 1.0`).
        self._model_info: Info | Gauge = (
            Gauge(
                "vlltr_model_info",
                "the served bundle and runtime",
                ["bundle_id", "provider", "precision"],
                multiprocess_mode="livemax",
                registry=r,
            )
            if self.multiprocess_dir
            else Info("vlltr_model", "the served bundle and runtime", registry=r)
        )
        self.class_table_version = Gauge(
            "vlltr_class_table_version", "version of the served class table", multiprocess_mode="livemax", registry=r
        )
        self.class_records = Gauge(
            "vlltr_class_records",
            "added classes in the store, by state: served, promoted (the bundle trains a class of that name, which "
            "wins) or quarantined (kept in the store, unreadable or unusable)",
            ["state"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.class_derivations_pending = Gauge(
            "vlltr_class_derivations_pending",
            "added classes whose text features and anchors for the served bundle are still being computed",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.class_derivations = Counter(
            "vlltr_class_derivations", "added classes whose features were computed for the served bundle", registry=r
        )
        self.class_store_reloads = Counter(
            "vlltr_class_store_reloads",
            "whole class-table reloads, by reason: epoch (the store was created again), rollback (its version went "
            "back), history (another change history), reconnect (the store came back after being away), forced",
            ["reason"],
            registry=r,
        )
        # Exported only when Redis is configured, so an alert on `== 0` never fires for the embedded default.
        self.redis_up: Gauge | None = (
            Gauge(
                "vlltr_redis_up",
                "1 when Redis answers, 0 while it does not",
                multiprocess_mode="livemin",
                registry=r,
            )
            if redis_enabled
            else None
        )
        # Pre-create the labelled children so every series exists (at 0) from the first scrape.
        for result in CACHE_RESULTS:
            self.cache_lookups.labels(result=result)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for stage in READ_STAGES:
            self.read_timeouts.labels(stage=stage)
        for tier in TIERS:
            self.predictions.labels(tier=tier)
        for source in ("trained", "added"):
            self.classes.labels(source=source)
        for state in CLASS_RECORD_STATES:
            self.class_records.labels(state=state)
        for reason in RELOAD_REASONS:
            self.class_store_reloads.labels(reason=reason)

    def set_redis_up(self, up: bool) -> None:
        """Record whether Redis answered (no-op without Redis)."""
        if self.redis_up is not None:
            self.redis_up.set(1 if up else 0)

    def set_model_info(self, *, bundle_id: str, provider: str, precision: str) -> None:
        """Record the served bundle and runtime (`vlltr_model_info`)."""
        if isinstance(self._model_info, Info):
            self._model_info.info({"bundle_id": bundle_id, "provider": provider, "precision": precision})
        else:
            self._model_info.labels(bundle_id=bundle_id, provider=provider, precision=precision).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type: this process's, or in the multi-process
        service every process's together."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client.multiprocess import MultiProcessCollector

        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
