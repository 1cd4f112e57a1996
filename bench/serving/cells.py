"""The measurement cells: each starts the system under test, drives load, and returns plain dicts."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving.bundles import BenchBundle
from bench.serving.classes import add_class, write_class_store
from bench.serving.load import run_load, summarise
from bench.serving.procs import ServerProcess
from bench.serving.profile import breakdown, histogram_quantile, scrape
from bench.serving.servers import start_handwritten, start_litserve, start_service, worker_flags

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Warm-up and measured seconds of one load cell."""

    warmup_s: float
    duration_s: float


@dataclass(frozen=True)
class Context:
    """What every cell needs: where to write, which images, how long, which load generator."""

    work: Path
    images: Path
    timing: Timing
    service_flags: tuple[str, ...] = ()
    generator: str = "wrk"


def _load(
    server: ServerProcess,
    ctx: Context,
    concurrency: int,
    tag: str,
    images: Path | None = None,
    timing: Timing | None = None,
    generator: str | None = None,
) -> dict[str, Any]:
    t = timing or ctx.timing
    result, _ = run_load(
        server,
        images or ctx.images,
        concurrency=concurrency,
        duration_s=t.duration_s,
        warmup_s=t.warmup_s,
        work_dir=ctx.work / "load",
        tag=tag,
        generator=generator or ctx.generator,
    )
    log.info(
        "%s c=%d: %.1f img/s, p50 %.1f ms, p99 %.1f ms, %d errors; %s used %.0f us CPU per request",
        tag,
        concurrency,
        result.throughput,
        result.p50_ms,
        result.p99_ms,
        result.errors,
        result.generator,
        result.client_cpu_us_per_request or float("nan"),
    )
    return result.to_dict()


def _scrape(server: ServerProcess) -> dict[tuple[str, str], float]:
    # A server whose /metrics cannot be read still gets its load measured; its profile is then empty.
    try:
        return scrape(server.base_url)
    except OSError as exc:
        log.warning("%s: cannot read /metrics (%s); no profile for this cell", server.name, exc)
        return {}


def _encoder_threads(server: ServerProcess) -> dict[str, Any]:
    """The intra-op threads the service chose for its image encoder at start (`GET /v1/model`), as
    {"encoder_threads": N or None (onnxruntime's default)}; empty when the service does not say."""
    try:
        with urllib.request.urlopen(server.base_url + "/v1/model", timeout=10.0) as resp:
            info = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read /v1/model (%s); its thread choice is not recorded", server.name, exc)
        return {}
    return {"encoder_threads": info["encoder_threads"]} if "encoder_threads" in info else {}


def service_sweep(
    bb: BenchBundle,
    ctx: Context,
    concurrencies: Sequence[int],
    workers: int = 1,
    tag: str = "",
    flags: Sequence[str] = (),
) -> dict[str, Any]:
    """The service with `workers` HTTP front-end processes (and extra `flags`) at each concurrency (cache off:
    every request decodes and runs the encoder), with the service's own per-stage timings at each."""
    out: dict[str, Any] = {"workers": workers, "flags": list(flags), "load": {}, "profile": {}}
    name = f"{bb.label}-service-w{workers}{tag}"
    all_flags = (*ctx.service_flags, *worker_flags(workers), *flags)
    with start_service(name, bb.bundle, ctx.work, flags=all_flags) as server:
        out |= _encoder_threads(server)
        for c in concurrencies:
            before = _scrape(server)
            out["load"][str(c)] = _load(server, ctx, c, f"{name}-c{c}")
            out["profile"][str(c)] = breakdown(before, _scrape(server))
    return out


def load_generators(bb: BenchBundle, ctx: Context, concurrency: int) -> dict[str, Any]:
    """The same service cell driven by wrk and by Locust, back to back on one server: what each load
    generator costs in CPU per request, and what the server answers under each."""
    out: dict[str, Any] = {"concurrency": concurrency}
    name = f"{bb.label}-service-generators"
    with start_service(name, bb.bundle, ctx.work, flags=(*ctx.service_flags, *worker_flags(1))) as server:
        for generator in ("wrk", "locust"):
            out[generator] = _load(server, ctx, concurrency, f"{name}-{generator}-c{concurrency}", generator=generator)
    return out


def service_variant(bb: BenchBundle, ctx: Context, concurrency: int, tag: str, flags: Sequence[str]) -> dict[str, Any]:
    """The same service started with extra `flags` (e.g. `--max-batch-size 1`: batching off)."""
    with start_service(f"{bb.label}-service-{tag}", bb.bundle, ctx.work, flags=(*ctx.service_flags, *flags)) as server:
        threads = _encoder_threads(server)
        before = scrape(server.base_url)
        load = _load(server, ctx, concurrency, f"{bb.label}-service-{tag}-c{concurrency}")
        return {"flags": list(flags), "load": load, "profile": breakdown(before, scrape(server.base_url))} | threads


def handwritten(bb: BenchBundle, ctx: Context, concurrency: int, device: str = "cpu") -> dict[str, Any]:
    """The hand-written FastAPI + PyTorch server."""
    with start_handwritten(f"{bb.label}-handwritten", bb.run, ctx.work, device=device) as server:
        return _load(server, ctx, concurrency, f"{bb.label}-handwritten-c{concurrency}")


def litserve(
    bb: BenchBundle, ctx: Context, concurrency: int, max_batch_size: int = 32, provider: str = "cpu"
) -> dict[str, Any]:
    """LitServe with its dynamic batching."""
    with start_litserve(
        f"{bb.label}-litserve", bb.bundle, ctx.work, max_batch_size=max_batch_size, provider=provider
    ) as server:
        return _load(server, ctx, concurrency, f"{bb.label}-litserve-c{concurrency}")


def cache_hits(bb: BenchBundle, ctx: Context, distinct: int, concurrencies: Sequence[int]) -> dict[str, Any]:
    """Repeated images with the in-process cache on: the warm-up fills the cache, then every request hits.
    The server-side p50 comes from the service's request-duration histogram (linear within a bucket)."""
    subset = ctx.work / f"cache-images-{distinct}"
    if not subset.is_dir():
        subset.mkdir(parents=True)
        for path in sorted(ctx.images.glob("*.jpg"))[:distinct]:
            shutil.copy(path, subset / path.name)
    out: dict[str, Any] = {"distinct_images": distinct, "load": {}, "server": {}}
    with start_service(
        f"{bb.label}-service-cache", bb.bundle, ctx.work, flags=ctx.service_flags, cache_size=4096
    ) as server:
        for c in concurrencies:
            # The first pass over the images is in the warm-up, so the measured requests are all hits.
            _load(
                server,
                ctx,
                1,
                f"{bb.label}-cache-fill-c{c}",
                images=subset,
                timing=Timing(0.0, max(1.0, ctx.timing.warmup_s)),
            )
            before = scrape(server.base_url)
            out["load"][str(c)] = _load(server, ctx, c, f"{bb.label}-cache-c{c}", images=subset)
            after = scrape(server.base_url)
            prof = breakdown(before, after)
            hits = sum(
                v - before.get(k, 0.0)
                for k, v in after.items()
                if k[0] == "vlltr_cache_lookups_total" and 'result="hit"' in k[1]
            )
            misses = sum(
                v - before.get(k, 0.0)
                for k, v in after.items()
                if k[0] == "vlltr_cache_lookups_total" and 'result="miss"' in k[1]
            )
            p50 = histogram_quantile(before, after, "vlltr_request_duration_seconds", 0.5, 'route="/v1/classify"')
            p99 = histogram_quantile(before, after, "vlltr_request_duration_seconds", 0.99, 'route="/v1/classify"')
            out["server"][str(c)] = {
                "p50_ms": None if p50 is None else 1000 * p50,
                "p99_ms": None if p99 is None else 1000 * p99,
                "hits": hits,
                "misses": misses,
                "profile": prof,
            }
    return out


def explain_cost(bb: BenchBundle, ctx: Context, concurrencies: Sequence[int]) -> dict[str, Any]:
    """`/v1/classify` without and with `explain=true` on one server (cache off), back to back at each
    concurrency: what the explanations cost (a plain request takes the unchanged batched path)."""
    out: dict[str, Any] = {"load": {}}
    with start_service(f"{bb.label}-service-explain", bb.bundle, ctx.work, flags=ctx.service_flags) as server:
        explained = dataclasses.replace(server, classify_path=server.classify_path + "&explain=true")
        for c in concurrencies:
            out["load"][str(c)] = {
                "plain": _load(server, ctx, c, f"{bb.label}-explain-off-c{c}"),
                "explain": _load(explained, ctx, c, f"{bb.label}-explain-on-c{c}"),
            }
    return out


def class_growth(bb: BenchBundle, ctx: Context, sizes: Sequence[int], concurrencies: Sequence[int]) -> dict[str, Any]:
    """Latency and throughput with `sizes` classes in the table (classes added programmatically through the
    class-store file before the service starts)."""
    out: dict[str, Any] = {}
    for total in sizes:
        store = ctx.work / f"{bb.label}-classes-{total}.json"
        added = write_class_store(store, bb.bundle, total)
        entry: dict[str, Any] = {"added": added, "load": {}, "server_p50_ms": {}}
        started = time.monotonic()
        with start_service(
            f"{bb.label}-service-{total}cls",
            bb.bundle,
            ctx.work,
            flags=(*ctx.service_flags, "--class-store", str(store)),
        ) as server:
            entry["start_s"] = time.monotonic() - started
            for c in concurrencies:
                before = scrape(server.base_url)
                entry["load"][str(c)] = _load(server, ctx, c, f"{bb.label}-{total}cls-c{c}")
                p50 = histogram_quantile(
                    before, scrape(server.base_url), "vlltr_request_duration_seconds", 0.5, 'route="/v1/classify"'
                )
                entry["server_p50_ms"][str(c)] = None if p50 is None else 1000 * p50
        out[str(total)] = entry
    return out


def add_under_load(bb: BenchBundle, ctx: Context, total_classes: int, concurrency: int) -> dict[str, Any]:
    """p99 of classifications without, then with, classes being added one after another over HTTP."""
    store = ctx.work / f"{bb.label}-classes-addload.json"
    write_class_store(store, bb.bundle, total_classes)
    out: dict[str, Any] = {"classes": total_classes, "concurrency": concurrency}
    with start_service(
        f"{bb.label}-service-addload", bb.bundle, ctx.work, flags=(*ctx.service_flags, "--class-store", str(store))
    ) as server:
        # Both runs keep per-request records (wrk then runs a thread per connection), so they see the same client.
        base, _ = run_load(
            server,
            ctx.images,
            concurrency=concurrency,
            duration_s=ctx.timing.duration_s,
            warmup_s=ctx.timing.warmup_s,
            work_dir=ctx.work / "load",
            tag=f"{bb.label}-addload-base",
            generator=ctx.generator,
            records=True,
        )
        out["without"] = base.to_dict()
        adds: list[tuple[float, float]] = []
        stop = threading.Event()

        def adder() -> None:
            time.sleep(ctx.timing.warmup_s)
            i = 0
            while not stop.is_set():
                started = time.time()
                took = add_class(server.base_url, f"added under load {i}")
                adds.append((started, took))
                i += 1
                stop.wait(0.2)

        thread = threading.Thread(target=adder, name="bench-adder", daemon=True)
        thread.start()
        # The records find the requests that overlapped an add.
        result, records = run_load(
            server,
            ctx.images,
            concurrency=concurrency,
            duration_s=ctx.timing.duration_s,
            warmup_s=ctx.timing.warmup_s,
            work_dir=ctx.work / "load",
            tag=f"{bb.label}-addload-adding",
            generator=ctx.generator,
            records=True,
        )
        stop.set()
        thread.join(60)
        out["with_adds"] = result.to_dict()
        # Requests whose lifetime overlapped an add (started before it ended and ended after it started).
        windows = [(s, s + t) for s, t in adds]
        overlapping = [r for r in records if any(r[0] < e and r[0] + r[1] / 1000 > s for s, e in windows)]
        if overlapping:
            span = sum(e - s for s, e in windows) or 1.0
            out["overlapping_adds"] = summarise(overlapping, span, concurrency).to_dict()
        took = np.array([t for _, t in adds]) * 1000
        out["adds"] = {
            "count": len(adds),
            "p50_ms": float(np.median(took)) if took.size else None,
            "max_ms": float(took.max()) if took.size else None,
        }
    return out
