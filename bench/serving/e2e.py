"""The in-process end-to-end ceiling: the load cells' own JPEGs decoded, preprocessed, encoded and scored with
the service's code in worker processes on the same cores, with no HTTP in the way.

Each worker process holds what a service process holds to classify: the bundle, the image encoder session
created as the service creates it (`create_image_encoder`, no intra-op spinning), a decode pool running the
service's decoding (`decode_image` with the bundle's JPEG draft rule and the service's pixel limit) and
preprocessing (`preprocess_image` with the bundle's spec), and a batching loop with the service's rule for
a batch while images are still being decoded (here they always are): it leaves when it holds the service's
largest batch or when its oldest image has waited the service's `max_wait_ms`. The batch is padded to the
service's power-of-two bucket and runs through the encoder, the head (`probabilities`, with the service's
shortlist rule and one BLAS thread) and the top-5. Decoding runs ahead of the encoder, so both stay busy.

One worker runs one batch at a time with a decode thread per core and the service's default intra-op threads
(ONNX Runtime's default or one thread, whichever runs a lone image faster, timed as the service times it:
`vlltr.model.runtime.encoder_threads`); several workers split the cores between them (cores / workers decode
threads and intra-op threads each: what the service's `--inference-lanes` does with threads of one process).
The ceiling is the best of the worker counts measured; the results say which.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlltr.model.runtime.machine import usable_cpus

READY_TIMEOUT_S = 600.0  # loading a large bundle and warming every bucket on two busy cores
START_DELAY_S = 0.5  # between the last worker being ready and the common start of the window


class E2EError(RuntimeError):
    """A worker failed or never became ready."""


@dataclass
class E2EPoint:
    """Images per second of `workers` worker processes together over one window."""

    when: str
    workers: int
    decode_threads: int  # per worker
    encoder_threads: int | None  # intra-op threads per worker (None: ONNX Runtime's default)
    max_batch_size: int
    max_wait_ms: float
    images: int
    seconds: float
    images_per_s: float
    mean_batch: float
    per_worker_images_per_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        """The point as a JSON-ready dict."""
        return asdict(self)


def layout(workers: int, cores: int | None = None) -> tuple[int, int | None]:
    """(decode threads, encoder intra-op threads) of each of `workers` workers."""
    from vlltr.service.settings import Settings

    if workers == 1:
        defaults = Settings.model_construct(workers=1)  # one process's defaults, whatever the environment says
        return defaults.decode_threads, defaults.encoder_threads(1)
    share = max(1, (cores or usable_cpus()) // workers)
    return share, share


def _worker(cfg: dict[str, Any], index: int, messages: Any, go: Any) -> None:
    """One worker process: build, warm, report ready, run the window it is given, report its count."""
    try:
        from vlltr.model.runtime.bundle import load_bundle
        from vlltr.model.runtime.encoder_threads import create_image_encoder
        from vlltr.model.runtime.head import Shortlist
        from vlltr.model.runtime.predictor import probabilities
        from vlltr.model.runtime.preprocess import decode_image, preprocess_image
        from vlltr.service.core import limit_blas_threads, top_k
        from vlltr.service.settings import Settings

        s = Settings.model_construct(max_batch_size=cfg["max_batch_size"])
        limit_blas_threads(s.head_threads)
        bundle = load_bundle(cfg["bundle"])
        spec = bundle.preprocess
        encoder, _ = create_image_encoder(  # the service's session (and its choice of threads, timed as it does)
            bundle.image_encoder_path,
            cfg["provider"],
            cfg["encoder_threads"],
            spec.size,
            fp16=bundle.precision == "fp16",
            spinning=s.ort_spinning,
        )
        shortlist = Shortlist(s.head_shortlist, s.head_shortlist_from) if s.head_shortlist > 0 else None
        table = bundle.class_table()
        draft = {"bundle": spec.draft_min_side, "on": spec.resize_size, "off": None}[s.jpeg_draft]
        buckets = s.buckets
        buffers = {b: np.zeros((b, 3, spec.size, spec.size), dtype=np.float32) for b in buckets}
        datas = [Path(p).read_bytes() for p in cfg["images"]]
        start = (index * len(datas)) // cfg["workers"]  # each worker cycles from its own offset
        images = itertools.cycle(datas[start:] + datas[:start])
        max_batch = cfg["max_batch_size"]
        depth = max_batch + 2 * cfg["decode_threads"]  # enough decoded ahead to fill a batch during a run

        def prepare(data: bytes) -> tuple[np.ndarray, float]:
            pixels = preprocess_image(decode_image(data, max_pixels=s.max_pixels, draft_min_side=draft), spec)
            return pixels, time.monotonic()  # when it was ready: the batch's deadline is its oldest image's

        def score(n: int) -> None:
            buf = buffers[next(b for b in buckets if b >= n)]
            feats = encoder.encode(buf)[:n]
            probs = probabilities(
                feats, bundle.head, table, bundle.log_prior, bundle.calibration, bundle.alpha, shortlist
            )
            top_k(probs, 5)

        max_wait = cfg["max_wait_s"] if cfg["max_wait_s"] is not None else s.max_wait_ms / 1000.0
        pool = ThreadPoolExecutor(max_workers=cfg["decode_threads"], thread_name_prefix="e2e-decode")
        pending: deque[Future[tuple[np.ndarray, float]]] = deque()

        def batch() -> int:
            while len(pending) < depth:
                pending.append(pool.submit(prepare, next(images)))
            first, ready = pending.popleft().result()
            rows = [first]
            # The service's rule while more images are being decoded (here they always are): the batch
            # leaves when full or when its oldest image has waited `max_wait_ms`.
            deadline = ready + max_wait
            while pending and len(rows) < max_batch:
                left = deadline - time.monotonic()
                if not pending[0].done() and left <= 0:
                    break
                try:
                    rows.append(pending[0].result(timeout=max(left, 0.0))[0])
                except TimeoutError:
                    break
                pending.popleft()
                while len(pending) < depth:
                    pending.append(pool.submit(prepare, next(images)))
            while len(pending) < depth:
                pending.append(pool.submit(prepare, next(images)))
            buf = buffers[next(b for b in buckets if b >= len(rows))]
            for i, px in enumerate(rows):
                buf[i] = px  # padding rows keep stale pixels, as in the service; their outputs are dropped
            score(len(rows))
            return len(rows)

        for b in buckets:  # the service warms every bucket before it is ready
            score(b)
        warm_until = time.monotonic() + cfg["warmup_s"]
        warm_batches = 0
        while warm_batches < 2 or time.monotonic() < warm_until:
            batch()
            warm_batches += 1
        for fut in pending:  # images decoded during the warm-up must not count in the window
            fut.result()
        pending.clear()
        messages.put(("ready", index, encoder.threads))
        t0, t1 = go.get(timeout=READY_TIMEOUT_S)
        time.sleep(max(0.0, t0 - time.time()))
        count = batches = 0
        while time.time() < t1:
            count += batch()
            batches += 1
        elapsed = time.time() - t0
        pool.shutdown(wait=False, cancel_futures=True)
        messages.put(("done", index, (count, batches, elapsed)))
    except BaseException as exc:  # reported to the parent, which raises it with the worker's index
        messages.put(("error", index, f"{type(exc).__name__}: {exc}"))


def measure_e2e(
    bundle_dir: Path,
    images: Sequence[Path],
    *,
    workers: int,
    max_batch_size: int,
    seconds: float,
    provider: str = "cpu",
    when: str = "",
    warmup_s: float = 1.0,
    max_wait_s: float | None = None,
) -> E2EPoint:
    """Images per second of `workers` worker processes classifying `images` in-process for `seconds`.

    Raises:
        E2EError: a worker failed or was not ready in time.
    """
    from vlltr.service.settings import Settings

    decode_threads, encoder_threads = layout(workers)
    cfg = {
        "bundle": str(bundle_dir),
        "images": [str(p) for p in images],
        "workers": workers,
        "max_batch_size": max_batch_size,
        "decode_threads": decode_threads,
        "encoder_threads": encoder_threads,
        "provider": provider,
        "warmup_s": warmup_s,
        "max_wait_s": max_wait_s,  # None: the service's default --max-wait-ms
    }
    ctx = mp.get_context("spawn")  # fresh interpreters: no thread pools or sessions inherited from the harness
    messages = ctx.Queue()
    gos = [ctx.Queue() for _ in range(workers)]
    procs = [ctx.Process(target=_worker, args=(cfg, i, messages, gos[i]), daemon=True) for i in range(workers)]
    for p in procs:
        p.start()
    try:
        ready = _collect(messages, procs, "ready", READY_TIMEOUT_S)
        t0 = time.time() + START_DELAY_S
        for g in gos:
            g.put((t0, t0 + seconds))
        done = _collect(messages, procs, "done", seconds + READY_TIMEOUT_S)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    counts = [done[i] for i in range(workers)]
    rates = [c / e for c, _, e in counts]
    total_images = sum(c for c, _, _ in counts)
    total_batches = sum(b for _, b, _ in counts)
    return E2EPoint(
        when=when,
        workers=workers,
        decode_threads=decode_threads,
        encoder_threads=ready[0],  # as the workers created their sessions (the layout's, or the service's choice)
        max_batch_size=max_batch_size,
        max_wait_ms=1000 * max_wait_s if max_wait_s is not None else Settings.model_construct().max_wait_ms,
        images=total_images,
        seconds=round(float(np.mean([e for _, _, e in counts])), 3),
        # Each worker's rate over its own window (they overlap but for the last batch of each).
        images_per_s=float(sum(rates)),
        mean_batch=total_images / max(total_batches, 1),
        per_worker_images_per_s=[round(r, 2) for r in rates],
    )


def _collect(messages: Any, procs: list[Any], kind: str, timeout: float) -> dict[int, Any]:
    """One `kind` message from every worker (an error message or a dead worker raises)."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(procs):
        try:
            tag, index, payload = messages.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in got]
            if dead:
                raise E2EError(f"end-to-end worker {dead[0]} exited with {procs[dead[0]].exitcode}") from None
            if time.monotonic() > deadline:
                raise E2EError(f"end-to-end workers not {kind} after {timeout:.0f} s") from None
            continue
        if tag == "error":
            raise E2EError(f"end-to-end worker {index} failed: {payload}")
        if tag == kind:
            got[index] = payload
    return got


def best(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The point with the highest throughput."""
    return max(points, key=lambda p: p["images_per_s"])
