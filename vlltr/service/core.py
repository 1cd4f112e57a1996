"""The serving core: bundle + encoder sessions + class registry + cache + micro-batcher, wired together.

Per image on the request path: (hash, cache look-up) -> decode + preprocess on the decode pool -> the
micro-batcher -> on the inference thread: image encoder (batch padded to a warmed bucket), then the head
against the current class table, then top-k -> only the top-k (and, on a cache miss, the image's features
for the cache) go back to the event loop. A cache hit skips decoding and the encoder but is still scored
against the current table in the same batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import PIL

from vlltr.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    InferenceFailedError,
    NotReadyError,
    QueueFullError,
    StoreUnavailableError,
    VlltrError,
)
from vlltr.model.runtime.bundle import Bundle, load_bundle
from vlltr.model.runtime.encoder_threads import create_image_encoder
from vlltr.model.runtime.head import Shortlist
from vlltr.model.runtime.manifest import Manifest, UnknownRule, pillow_mismatch
from vlltr.model.runtime.predictor import probabilities, probabilities_and_nearness
from vlltr.model.runtime.preprocess import decode_image, preprocess_image
from vlltr.model.runtime.sessions import ImageEncoder, TextEncoder
from vlltr.model.runtime.unknown import Nearness, effective_rule, score_values
from vlltr.service.batcher import MicroBatcher
from vlltr.service.cache import EmbeddingCache, LocalLRUCache, RedisEmbeddingCache, cache_key
from vlltr.service.explain import ClassifyOptions, LabelEncoder, OptionScorer, PreparedOptions, check_options
from vlltr.service.metrics import Metrics
from vlltr.service.redis_link import RedisLink
from vlltr.service.registry import TIER_NAMES, ClassRegistry, ServedTable, TrainedClasses
from vlltr.service.schemas import Prediction, Verdict
from vlltr.service.settings import Settings
from vlltr.service.store import ClassStore
from vlltr.service.store_file import FileClassStore
from vlltr.service.store_redis import RedisClassStore

log = logging.getLogger(__name__)

HASH_ON_LOOP_BYTES = 256 * 1024  # smaller uploads are hashed on the event loop (cheaper than a thread hop)
# A cache hit needs only the head. Against a table of at most this many anchor rows (classes x anchors) it is
# scored on the event loop (well under a millisecond), saving the two thread hand-offs of the batcher, which
# cost more than the scoring itself when the cores are busy; larger tables go through the batcher.
INLINE_SCORE_MAX_ROWS = 16_384
DEFAULT_SHOT_THRESHOLDS = (100, 20)  # many > 100, few < 20 training images (OLTR's groups)
QUEUE_FULL = "the service is at capacity (inference queue full); retry later"
INFERENCE_FAILED = "inference failed for this image; retry later"


def as_image_error(exc: Exception) -> VlltrError:
    """A decode/preprocess failure of one image as the domain error answered for it: the typed image errors
    (and the service's own refusals) as they are; anything else a decoder raises on crafted bytes is still
    "this is not an image we can read"."""
    if isinstance(exc, VlltrError):
        return exc
    return ImageDecodeError(f"cannot decode the image ({type(exc).__name__})")


@dataclass(slots=True)
class ImageJob:
    """One image for the inference thread: preprocessed pixels, or cached features (then no encoder)."""

    pixels: np.ndarray | None
    features: np.ndarray | None
    top_k: int
    options: PreparedOptions | None = None  # None: a plain request (scored with the whole batch at once)


@dataclass(slots=True)
class Scored:
    """The top-k of one image against one class table."""

    class_ids: np.ndarray
    scores: np.ndarray
    served: ServedTable
    features: np.ndarray | None  # set when the encoder ran (the value to cache)
    verdict: Verdict
    custom: list[Prediction] | None = None  # a request with options: its predictions, built by `OptionScorer`

    def predictions(self) -> list[Prediction]:
        if self.custom is not None:
            return self.custom
        names = self.served.table.names
        return [
            Prediction(label=names[i], score=float(s), class_id=int(i))
            for i, s in zip(self.class_ids.tolist(), self.scores.tolist())
        ]

    @property
    def version(self) -> int:
        return self.served.version

    @property
    def top_tier(self) -> str | None:
        """The tier of the best class (None for a ranking of ad-hoc labels)."""
        if self.custom is not None and (not self.custom or self.custom[0].class_id is None):
            return None
        return TIER_NAMES[int(self.served.tiers[int(self.class_ids[0])])]


class Answer(Protocol):
    """What the classify routes read of one image's result (`Scored`, or the engine's answer in a front-end)."""

    @property
    def version(self) -> int: ...

    @property
    def verdict(self) -> Verdict: ...

    def predictions(self) -> list[Prediction]: ...


class Classifier(Protocol):
    """What the classify and health routes use: `ServingCore` in a single process, `FrontCore`
    (`vlltr.service.frontend`) in a front-end of the multi-process service."""

    settings: Settings
    bundle: Bundle
    metrics: Metrics

    def check_accepting(self, n: int) -> None: ...

    async def classify(self, data: bytes | bytearray, top_k: int, options: ClassifyOptions | None = None) -> Answer: ...

    async def classify_many(
        self, images: Sequence[bytes | bytearray], top_k: int, options: ClassifyOptions | None = None
    ) -> Sequence[Answer | VlltrError]: ...

    def readiness(self) -> tuple[dict[str, bool], int | None]: ...

    @property
    def table_version(self) -> int: ...

    async def before_serving(self) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def shot_thresholds(manifest: Manifest) -> tuple[int, int]:
    """(many, few) train-count thresholds recorded by training, else OLTR's (100, 20)."""
    groups = manifest.training.shot_groups() if manifest.training is not None else None
    return (groups.many, groups.few) if groups is not None else DEFAULT_SHOT_THRESHOLDS


def tiers_from_counts(counts: Sequence[int], many: int, few: int) -> np.ndarray:
    """0 head (> many), 1 medium, 2 tail (< few) per class."""
    c = np.asarray(counts)
    return np.where(c > many, 0, np.where(c < few, 2, 1)).astype(np.int8)


def trained_classes(bundle: Bundle) -> TrainedClasses:
    """The registry's view of a bundle's trained classes (table, counts, anchors, tiers)."""
    many, few = shot_thresholds(bundle.manifest)
    counts = tuple(int(c["train_count"]) for c in bundle.classes)
    return TrainedClasses(
        table=bundle.class_table(),
        params=bundle.head,
        train_counts=counts,
        anchors=tuple(tuple(c.get("anchors") or ()) for c in bundle.classes),
        tiers=tiers_from_counts(counts, many, few),
    )


def limit_blas_threads(threads: int) -> bool:
    """Cap numpy's BLAS thread pool for the whole process (0 leaves it alone); True when a cap was set.

    The head's products are small (a batch of image features against the class table), and a multi-threaded
    BLAS spends more time waking and synchronising its threads than computing whenever the cores are busy
    with the encoder, the decoders and the event loop: on two busy cores, scoring one image against 1,000
    classes took 16 ms with BLAS on both and 0.5 ms with one thread."""
    if threads <= 0:
        return False
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.warning(
            "threadpoolctl is not installed: numpy's BLAS keeps its default thread count, which makes "
            "the head slow when the cores are busy (pip install threadpoolctl)"
        )
        return False
    threadpool_limits(limits=threads, user_api="blas")
    return True


def verdict(rule: UnknownRule | None, confidence: float, near: Nearness | None) -> Verdict:
    """How sure one image's answer is: its top score, and the `unknown` verdict of `rule` from its scores
    `near` (one row; no verdict without a rule, or without scores: a ranking of ad-hoc labels)."""
    if rule is None or near is None:
        return Verdict(confidence=confidence)
    value = float(score_values(rule.score, near, np.array([confidence], dtype=np.float32), rule)[0])
    return Verdict(confidence=confidence, unknown=value < rule.threshold, unknown_score=value)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `k` largest of each row, best first (ties: lower index first)."""
    n, c = probs.shape
    k = min(k, c)
    if k < c:
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(c), (n, c))
    vals = np.take_along_axis(probs, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(vals, order, axis=1)


class ImagePreparer:
    """The request path's work before the encoder, for one process: size check, cache look-up, decode and
    preprocess on a thread pool. The single-process service runs it beside its encoder; in the multi-process
    service (`vlltr.service.workers`) every HTTP front-end runs its own, and only the prepared pixels (or the
    cached features) travel to the engine."""

    def __init__(self, settings: Settings, bundle: Bundle, cache: EmbeddingCache | None, metrics: Metrics) -> None:
        self.settings = settings
        self.bundle = bundle
        self.cache = cache
        self.metrics = metrics
        spec = bundle.preprocess
        self.draft_min_side = {"bundle": spec.draft_min_side, "on": spec.resize_size, "off": None}[settings.jpeg_draft]
        self.pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="vlltr-decode")

    def pixels(self, data: bytes | bytearray) -> np.ndarray:
        """Decode and preprocess one image (blocking; raises what the decoder raises)."""
        started = time.monotonic()
        img = decode_image(data, max_pixels=self.settings.max_pixels, draft_min_side=self.draft_min_side)
        pixels = preprocess_image(img, self.bundle.preprocess)
        self.metrics.preprocess_duration.observe(time.monotonic() - started)
        return pixels

    async def digest(self, data: bytes | bytearray) -> str:
        """The image's sha256 (off the event loop for large uploads)."""
        if len(data) <= HASH_ON_LOOP_BYTES:
            return hashlib.sha256(data).hexdigest()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: hashlib.sha256(data).hexdigest())

    async def job(self, data: bytes | bytearray, top_k: int) -> tuple[ImageJob, str | None]:
        """Cache look-up, else decode + preprocess: the job and its cache key (None: nothing to cache).
        Raises an image error of `vlltr.errors` for a bad image."""
        if len(data) > self.settings.max_image_bytes:
            raise ImageTooLargeError(
                f"image is {len(data)} bytes, over the limit of {self.settings.max_image_bytes}",
                limit=self.settings.max_image_bytes,
            )
        key = None
        if self.cache is not None:
            key = cache_key(self.bundle.bundle_id, await self.digest(data))
            features = await self.cache.get(key)
            if features is not None:
                return ImageJob(None, features, top_k), None
        loop = asyncio.get_running_loop()
        try:
            pixels = await loop.run_in_executor(self.pool, self.pixels, data)
        except Exception as exc:  # every decoder failure is the client's image, never a 500
            raise as_image_error(exc) from None
        return ImageJob(pixels, None, top_k), key

    def remember(self, key: str | None, features: np.ndarray | None) -> None:
        """Cache the features the encoder computed for an image (no-op without a key or a cache)."""
        if key is not None and features is not None and self.cache is not None:
            self.cache.put(key, features)

    def close(self) -> None:
        """Stop the decode pool."""
        self.pool.shutdown(wait=False, cancel_futures=True)


class _LaneBuffers(threading.local):
    """Batch arrays by bucket size, one set per inference lane (thread), so lanes never share one."""

    def __init__(self) -> None:
        self.by_bucket: dict[int, np.ndarray] = {}


class ServingCore:
    """Everything a running service holds. Build with `ServingCore.load` (blocking), then `await start()`."""

    def __init__(
        self,
        settings: Settings,
        bundle: Bundle,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        metrics: Metrics,
        lanes: int = 1,
    ) -> None:
        self.settings = settings
        self.shortlist = (
            Shortlist(settings.head_shortlist, settings.head_shortlist_from) if settings.head_shortlist > 0 else None
        )
        self.bundle = bundle
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.metrics = metrics
        # The `unknown` verdict: the bundle's fitted threshold, or the setting's, or none (older bundles).
        self.unknown_rule = effective_rule(bundle.calibration.unknown, settings.unknown_threshold)
        self.provider = image_encoder.provider
        self.buckets = settings.buckets
        self.warmed = False
        self.started = False
        self.inflight = 0  # images admitted and not answered yet (event loop only)
        # Images admitted and not yet handed to the batcher (cache look-up, decoding). Written on the event
        # loop only; the inference thread reads it to dispatch a batch early when nothing else is coming.
        self.preparing = 0
        self._size = bundle.preprocess.size
        self._lane_buffers = _LaneBuffers()
        self._tasks: list[asyncio.Task[None]] = []
        self.redis: RedisLink | None = None
        store: ClassStore
        if settings.redis_url:
            self.redis = RedisLink(
                settings.redis_url,
                timeout_s=settings.redis_timeout_s,
                retry_s=settings.redis_retry_s,
                store_timeout_s=settings.redis_store_timeout_s,
                metrics=metrics,
            )
            store = RedisClassStore(self.redis, prefix=settings.redis_prefix)
            self.cache: EmbeddingCache | None = RedisEmbeddingCache(
                self.redis,
                prefix=settings.redis_prefix,
                dim=bundle.embed_dim,
                ttl_s=settings.cache_ttl_s,
                metrics=metrics,
            )
        else:
            store = FileClassStore(settings.class_store_path, legacy_path=settings.legacy_class_store_path)
            self.cache = (
                LocalLRUCache(settings.cache_size, bundle.embed_dim, metrics) if settings.cache_size > 0 else None
            )
        self.registry = ClassRegistry(
            trained_classes(bundle),
            text_encoder.encode_texts,
            store,
            bundle_id=bundle.bundle_id,
            sync_interval_s=settings.sync_interval_s,
            duplicate_threshold=settings.duplicate_threshold,
            metrics=metrics,
        )
        self.option_scorer = OptionScorer(bundle, self.registry.trained)
        self.label_encoder = LabelEncoder(text_encoder.encode_texts)
        self.batcher: MicroBatcher[ImageJob, Scored] = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size,
            metrics=metrics,
            upstream=lambda: self.preparing,
            lanes=lanes,
        )
        self.prep = ImagePreparer(settings, bundle, self.cache, metrics)
        metrics.set_model_info(bundle_id=bundle.bundle_id, provider=self.provider, precision=bundle.precision)

    # ---- construction and lifecycle --------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> ServingCore:
        """Load the bundle and create the sessions (blocking). Raises on a bad bundle or an unusable
        provider (`provider=cuda` without CUDA really active), so a misconfigured service fails at start."""
        if settings.bundle is None:
            raise ValueError("settings.bundle is not set (the command line resolves the demo bundle)")
        started = time.monotonic()
        limit_blas_threads(settings.head_threads)
        bundle = load_bundle(settings.bundle)
        mismatch = pillow_mismatch(bundle.manifest, PIL.__version__)
        if mismatch is not None:
            log.warning("%s", mismatch)
        # A device runs one batch at a time on its own stream, where lanes would only contend for it; with
        # `auto` the provider is known once the session exists, and the lanes are dropped then.
        lanes = 1 if settings.provider == "cuda" else settings.inference_lanes
        threads = settings.encoder_threads(lanes)
        fp16 = bundle.precision == "fp16"
        spin = settings.ort_spinning
        image_encoder, choice = create_image_encoder(
            bundle.image_encoder_path, settings.provider, threads, bundle.preprocess.size, fp16=fp16, spinning=spin
        )
        if image_encoder.provider != "cpu":
            lanes = 1
        if choice is not None:
            log.info("%s", choice.describe())
        # One intra-op thread for the text encoder: it runs only when a class is added, a few sentences at a
        # time, and a second thread would take a core from the image encoder serving requests meanwhile.
        text_encoder = TextEncoder(
            bundle.text_encoder_path, bundle.tokenizer(), settings.provider, 1, fp16=fp16, spinning=spin
        )
        log.info(
            "bundle %s (%s, %d classes, %s) loaded in %.1f s; image encoder on %s (%d lane%s, %s intra-op "
            "threads each), text encoder on %s",
            bundle.bundle_id,
            bundle.arch,
            bundle.num_classes,
            bundle.precision,
            time.monotonic() - started,
            image_encoder.provider,
            lanes,
            "" if lanes == 1 else "s",
            image_encoder.threads or "onnxruntime's default",
            text_encoder.provider,
        )
        return cls(settings, bundle, image_encoder, text_encoder, metrics, lanes)

    async def before_serving(self) -> None:
        """Nothing: a single process accepts connections at once and says not ready until `start` is done."""

    async def start(self) -> None:
        """Warm every bucket, load the class table (retrying while the store is unreachable), then start
        the inference thread and its supervisor. Readiness follows these steps."""
        if self.redis is not None:
            await self.redis.ping()
            self.redis.start()
        await asyncio.to_thread(self.warm_up)
        await self._start_registry()
        self.batcher.start()
        self._tasks.append(asyncio.create_task(self._supervise(), name="vlltr-supervisor"))
        self.started = True
        # Everything loaded so far (bundle, tokenizer vocabulary, class table) lives as long as the process;
        # moving it out of the collector's generations keeps full collections on the request path short.
        gc.collect()
        gc.freeze()
        log.info(
            "ready: bundle %s, class table version %d, buckets %s",
            self.bundle.bundle_id,
            self.registry.current.version,
            list(self.buckets),
        )

    async def _start_registry(self) -> None:
        last_error = ""
        while True:
            try:
                await self.registry.start()
                return
            except StoreUnavailableError as exc:
                if str(exc) != last_error:
                    log.warning("cannot load the class table yet: %s (retrying every second)", exc)
                    last_error = str(exc)
                await asyncio.sleep(1.0)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.batcher.ensure_running()

    async def stop(self) -> None:
        """Stop the inference thread, background tasks and connections."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self.batcher.stop()
        await self.registry.close()
        if self.cache is not None:
            await self.cache.close()
        if self.redis is not None:
            await self.redis.close()
        self.prep.close()

    def warm_up(self) -> None:
        """Run every batch bucket through the encoder and the head once (first runs of a shape are slow)."""
        table = self.registry.trained.table
        b = self.bundle
        for bucket in self.buckets:
            started = time.monotonic()
            # A fresh array, not a lane's: this thread never runs batches, and its arrays would stay allocated.
            feats = self.image_encoder.encode(np.zeros((bucket, 3, self._size, self._size), dtype=np.float32))
            probabilities(feats, b.head, table, b.log_prior, b.calibration, b.alpha)
            log.info("warmed batch bucket %d in %.3f s", bucket, time.monotonic() - started)
        self.text_encoder.encode_texts(["a photo."])
        self.warmed = True

    def ready(self) -> dict[str, bool]:
        """The readiness checks."""
        return {
            "bundle_loaded": True,
            "sessions_warmed": self.warmed,
            "class_table_loaded": self.registry.loaded,
            "inference_loop_alive": self.started and self.batcher.alive(),
        }

    # ---- the inference thread ---------------------------------------------------------------

    def _buffer(self, bucket: int) -> np.ndarray:
        buffers = self._lane_buffers.by_bucket
        buf = buffers.get(bucket)
        if buf is None:
            buf = np.zeros((bucket, 3, self._size, self._size), dtype=np.float32)
            buffers[bucket] = buf
        return buf

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _run_batch(self, jobs: list[ImageJob]) -> list[Scored]:
        served = self.registry.current  # one table for the whole batch
        b = self.bundle
        feats = np.empty((len(jobs), b.embed_dim), dtype=np.float32)
        rows = [i for i, job in enumerate(jobs) if job.pixels is not None]
        if rows:
            buf = self._buffer(self._bucket(len(rows)))
            for slot, i in enumerate(rows):
                buf[slot] = jobs[i].pixels  # padding rows keep stale data; their outputs are dropped
            feats[rows] = self.image_encoder.encode(buf)[: len(rows)]
        for i, job in enumerate(jobs):
            if job.pixels is None:
                feats[i] = job.features
        plain = [i for i, job in enumerate(jobs) if job.options is None]
        out: list[Scored] = [None] * len(jobs)  # type: ignore[list-item]  # every slot is filled below
        if plain:
            rows_in = feats if len(plain) == len(jobs) else feats[plain]  # all plain (options off): no copy
            probs, near = probabilities_and_nearness(
                rows_in, b.head, served.table, b.log_prior, b.calibration, b.alpha, self.shortlist, b.prototypes
            )
            idx, vals = top_k(probs, max(jobs[i].top_k for i in plain))
            for row, i in enumerate(plain):
                k = jobs[i].top_k
                out[i] = Scored(
                    idx[row, :k],
                    vals[row, :k],
                    served,
                    feats[i] if jobs[i].pixels is not None else None,
                    verdict(self.unknown_rule, float(vals[row, 0]), near.row(row)),
                )
        for i, job in enumerate(jobs):
            if job.options is not None:  # explanations, a class subset or ad-hoc labels: scored one by one
                ids, scores, custom, nearness = self.option_scorer.score(feats[i], served, job.options, job.top_k)
                sure = verdict(self.unknown_rule, float(scores[0]) if len(scores) else 0.0, nearness)
                out[i] = Scored(ids, scores, served, feats[i] if job.pixels is not None else None, sure, custom)
        return out

    # ---- the request path -----------------------------------------------------------------

    def check_accepting(self, n: int) -> None:
        """`NotReadyError` when not started; `QueueFullError` when `n` more images would take the images in
        flight (being decoded, waiting or in a batch) past `queue_size`: the bound covers the decode
        backlog too, so a flood is refused at the door instead of piling up in memory."""
        if not self.started:
            raise NotReadyError("the service is starting; try again shortly")
        if self.inflight + n > self.settings.queue_size:
            raise QueueFullError(QUEUE_FULL)

    @contextlib.contextmanager
    def _admitted(self, n: int) -> Iterator[None]:
        # Only the event loop touches the counter, so it needs no lock.
        self.check_accepting(n)
        self.inflight += n
        try:
            yield
        finally:
            self.inflight -= n

    async def _job(
        self, data: bytes | bytearray, top_k: int, options: PreparedOptions | None = None
    ) -> tuple[ImageJob, str | None]:
        """Cache look-up, else decode + preprocess. Raises an image error of `vlltr.errors` for a bad image.

        Counted in `preparing` until it returns; callers submit the job in the same event-loop step, so the
        batcher never sees the count drop before the job is queued. When the count reaches 0 the batcher
        is asked to look again after that step: an image that failed, or was answered from the cache,
        is never submitted, and a batch waiting for it may leave at once."""
        self.preparing += 1
        try:
            job, key = await self.prep.job(data, top_k)
            job.options = options
            return job, key
        finally:
            self.preparing -= 1
            if self.preparing == 0:
                asyncio.get_running_loop().call_soon(self.batcher.recheck)

    def _finish(self, scored: Scored, key: str | None) -> Scored:
        self.prep.remember(key, scored.features)
        tier = scored.top_tier
        if tier is not None:
            self.metrics.predictions.labels(tier=tier).inc()
        return scored

    def _submit(self, jobs: list[ImageJob]) -> list[asyncio.Future[Scored]]:
        try:
            return self.batcher.submit_many(jobs)
        except QueueFullError:
            raise QueueFullError(QUEUE_FULL) from None  # the client's wording, not the batcher's counts
        except NotReadyError:
            raise NotReadyError("the service is shutting down") from None

    async def prepare_options(self, options: ClassifyOptions | None) -> PreparedOptions | None:
        """Check `options` against the served table (`ClassValidationError`) and encode ad-hoc labels; None
        for a plain request."""
        if options is None or options.plain:
            return None
        check_options(options, self.registry.current)
        features = None
        if options.labels is not None:
            try:
                features = await asyncio.to_thread(self.label_encoder.features, options.labels)
            except Exception as exc:  # the labels were checked; a failure here is the encoder's, never a 500
                log.warning("encoding ad-hoc labels failed: %s: %s", type(exc).__name__, exc)
                raise InferenceFailedError(INFERENCE_FAILED) from None
        return PreparedOptions(options, features)

    async def classify(self, data: bytes | bytearray, top_k: int, options: ClassifyOptions | None = None) -> Scored:
        """Classify one image. Raises the domain errors of `vlltr.errors` for a bad image, a full queue, a
        service not ready or a failed inference, and `ClassValidationError` for options it cannot honour."""
        prepared = await self.prepare_options(options)
        with self._admitted(1):
            job, key = await self._job(data, top_k, prepared)
            if job.pixels is None and self._score_inline():
                try:
                    scored = self._run_batch([job])[0]
                except Exception as exc:
                    log.warning("scoring a cached image failed: %s: %s", type(exc).__name__, exc)
                    raise InferenceFailedError(INFERENCE_FAILED) from None
                return self._finish(scored, key)
            future = self._submit([job])[0]
            try:
                scored = await future
            except Exception as exc:
                log.warning("inference failed for an image: %s: %s", type(exc).__name__, exc)
                raise InferenceFailedError(INFERENCE_FAILED) from None
        return self._finish(scored, key)

    def _score_inline(self) -> bool:
        table = self.registry.current.table
        return table.num_classes * table.num_anchors <= INLINE_SCORE_MAX_ROWS

    async def classify_many(
        self, images: Sequence[bytes | bytearray], top_k: int, options: ClassifyOptions | None = None
    ) -> list[Scored | VlltrError]:
        """Classify several images; each entry is its result or its own domain error, in order (options that
        cannot be honoured raise `ClassValidationError` for the whole request)."""
        ready = await self.prepare_options(options)
        with self._admitted(len(images)):
            prepared = await asyncio.gather(*(self._job(data, top_k, ready) for data in images), return_exceptions=True)
            out: list[Scored | VlltrError] = []
            ok: list[int] = []
            for i, item in enumerate(prepared):
                if isinstance(item, BaseException):
                    out.append(
                        as_image_error(item)
                        if isinstance(item, Exception)
                        else ImageDecodeError("the image could not be read")
                    )
                else:
                    out.append(InferenceFailedError(INFERENCE_FAILED))  # replaced below once scored
                    ok.append(i)
            futures = self._submit([prepared[i][0] for i in ok]) if ok else []  # type: ignore[index]
            results = await asyncio.gather(*futures, return_exceptions=True)
        for i, result in zip(ok, results):
            if isinstance(result, Scored):
                out[i] = self._finish(result, prepared[i][1])  # type: ignore[index]
            else:
                log.warning("inference failed for image %d of a batch: %s", i, result)
        return out

    async def score_prepared(self, jobs: Sequence[ImageJob]) -> list[Scored | VlltrError]:
        """Score jobs prepared elsewhere (the multi-process service's front-ends decode, the engine scores):
        each entry is its result or its own error, in order. Raises `QueueFullError` or `NotReadyError` for
        the whole call when it cannot be admitted. The features of an encoded image come back in its result
        (the front-end caches them); the top-1 counts in `vlltr_predictions_total` here."""
        with self._admitted(len(jobs)):
            if all(job.pixels is None for job in jobs) and self._score_inline():
                try:
                    scored: list[Scored | BaseException] = list(self._run_batch(list(jobs)))
                except Exception as exc:
                    log.warning("scoring cached images failed: %s: %s", type(exc).__name__, exc)
                    scored = [exc] * len(jobs)
            else:
                scored = list(await asyncio.gather(*self._submit(list(jobs)), return_exceptions=True))
        out: list[Scored | VlltrError] = []
        for i, result in enumerate(scored):
            if isinstance(result, Scored):
                self.metrics.predictions.labels(tier=result.top_tier).inc()
                out.append(result)
            else:
                log.warning("inference failed for image %d of a request: %s", i, result)
                out.append(InferenceFailedError(INFERENCE_FAILED))
        return out

    def readiness(self) -> tuple[dict[str, bool], int | None]:
        """The readiness checks and the served class-table version (None until the table is loaded)."""
        return self.ready(), self.registry.current.version if self.registry.loaded else None

    @property
    def table_version(self) -> int:
        """The current class-table version."""
        return self.registry.current.version
