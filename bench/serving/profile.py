"""Where the service's time goes, from its own Prometheus histograms scraped before and after a load cell."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def scrape(base_url: str, timeout: float = 10.0) -> dict[tuple[str, str], float]:
    """The service's /metrics as {(name, labels): value}."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.match(line.strip())
        if m:
            try:
                out[(m["name"], m["labels"] or "")] = float(m["value"])
            except ValueError:
                continue
    return out


def _delta(before: dict, after: dict, name: str, label_filter: str = "") -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and label_filter in k[1])


def _buckets(before: dict, after: dict, name: str, label_filter: str = "") -> list[tuple[float, float]]:
    edges: dict[float, float] = {}
    for key, value in after.items():
        if key[0] != f"{name}_bucket" or label_filter not in key[1]:
            continue
        le = re.search(r'le="([^"]+)"', key[1])
        if le:
            edge = float("inf") if le[1] == "+Inf" else float(le[1])
            edges[edge] = edges.get(edge, 0.0) + value - before.get(key, 0.0)
    return sorted(edges.items())


def histogram_quantile(before: dict, after: dict, name: str, q: float, label_filter: str = "") -> float | None:
    """The q-quantile of a histogram's observations between two scrapes, interpolated linearly inside its
    bucket (as Prometheus's `histogram_quantile` does); None without observations."""
    cum = _buckets(before, after, name, label_filter)
    if not cum or cum[-1][1] <= 0:
        return None
    target = q * cum[-1][1]
    prev_edge, prev_count = 0.0, 0.0
    for edge, count in cum:
        if count >= target:
            if edge == float("inf"):
                return prev_edge
            if count == prev_count:
                return edge
            return prev_edge + (edge - prev_edge) * (target - prev_count) / (count - prev_count)
        prev_edge, prev_count = edge, count
    return prev_edge


def breakdown(before: dict, after: dict) -> dict[str, Any]:
    """Mean time per image in each stage the service measures, and the mean batch size."""
    images = _delta(before, after, "vlltr_preprocess_duration_seconds_count")
    batches = _delta(before, after, "vlltr_batch_size_count")
    batched_images = _delta(before, after, "vlltr_batch_size_sum")
    requests = _delta(before, after, "vlltr_request_duration_seconds_count", 'route="/v1/classify"')
    out: dict[str, Any] = {"requests": requests, "images_decoded": images, "batches": batches}
    if requests:
        out["request_ms_mean"] = (
            1000 * _delta(before, after, "vlltr_request_duration_seconds_sum", 'route="/v1/classify"') / requests
        )
        out["request_ms_p50_server"] = _ms(
            histogram_quantile(before, after, "vlltr_request_duration_seconds", 0.5, 'route="/v1/classify"')
        )
    if images:
        out["decode_preprocess_ms_per_image"] = (
            1000 * _delta(before, after, "vlltr_preprocess_duration_seconds_sum") / images
        )
    if batches:
        out["mean_batch_size"] = batched_images / batches
        out["inference_ms_per_batch"] = 1000 * _delta(before, after, "vlltr_inference_duration_seconds_sum") / batches
        out["inference_ms_per_image"] = out["inference_ms_per_batch"] / max(out["mean_batch_size"], 1e-9)
        waits = _delta(before, after, "vlltr_queue_wait_seconds_count")
        if waits:
            out["queue_wait_ms_mean"] = 1000 * _delta(before, after, "vlltr_queue_wait_seconds_sum") / waits
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds
