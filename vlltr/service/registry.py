"""The class table served right now: trained classes from the bundle plus classes added by text.

- Adding a class: validate, encode the descriptions and the name's prompts with the text encoder (on the
  text thread), choose its anchors (`vlltr.model.runtime.head.build_added_class_anchors`: close to the name, far from
  every class already served), check for near-duplicates, write it to the durable
  store (atomic: one winner per name across replicas), then rebuild the table.
- The table is rebuilt off the request path (in a worker thread) and swapped in by ONE reference
  assignment; a batch reads `registry.current` once and is scored entirely against that table.
- Replicas converge: store notifications (Redis pub/sub) trigger a refresh, and a periodic version check
  (`sync_interval_s`) catches anything a notification missed. The served version is the store's version.
"""

from __future__ import annotations

import asyncio
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np

from vlltr.errors import (
    ClassConflictError,
    ClassValidationError,
    InferenceFailedError,
    NotReadyError,
    StoreUnavailableError,
    TrainedClassError,
)
from vlltr.model.runtime.head import (
    ClassEntry,
    ClassTable,
    HeadParams,
    build_added_class_anchors,
    class_directions,
    unit_mean,
)
from vlltr.model.runtime.prompts import name_prompts
from vlltr.service.metrics import Metrics
from vlltr.service.store import AddedClass, ClassStore, StoreSnapshot, name_key

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 100
Tier = Literal["head", "medium", "tail", "added"]
TIER_NAMES: tuple[Tier, ...] = ("head", "medium", "tail", "added")
# Unicode categories refused in names: controls, format characters (zero-width, bidi overrides),
# surrogates, private use, unassigned, line and paragraph separators.
_BAD_NAME_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_BAD_TEXT_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}


async def cancel_until_done(tasks: Sequence[asyncio.Task[None]], retry_s: float = 0.2) -> None:
    """Cancel tasks and wait until each has ended, cancelling again if one swallowed the cancellation.

    A task cancelled while it is inside a library call can have the cancellation absorbed there and go on
    to its next `await`; a single `cancel()` then waits on it forever (this hung shutdowns under load).
    """
    for task in tasks:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=retry_s)
        if not task.cancelled():
            task.exception()  # retrieved: an error of a background task at shutdown is not news


def normalize_name(raw: object) -> str:
    """NFC-normalise and check a class name; raises `ClassValidationError` naming the problem."""
    if not isinstance(raw, str):
        raise ClassValidationError("name must be a string")
    name = unicodedata.normalize("NFC", raw).strip()
    if not name:
        raise ClassValidationError("name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ClassValidationError(f"name is {len(name)} characters long; the limit is {MAX_NAME_CHARS}")
    if "/" in name or "\\" in name:
        raise ClassValidationError("name must not contain path separators ('/' or '\\')")
    if set(name) == {"."}:  # '.' and '..' are path segments: clients normalise them out of URLs
        raise ClassValidationError("name must not consist of dots only")
    for ch in name:
        if unicodedata.category(ch) in _BAD_NAME_CATEGORIES:
            raise ClassValidationError(f"name contains a control or invisible character (U+{ord(ch):04X})")
    return name


def _clean_description(item: object, where: str, max_chars: int) -> str:
    if not isinstance(item, str):
        raise ClassValidationError(f"{where} must be a string")
    text = unicodedata.normalize("NFC", item).strip()
    if not text:
        raise ClassValidationError(f"{where} is empty")
    if len(text) > max_chars:
        raise ClassValidationError(f"{where} is {len(text)} characters long; the limit is {max_chars}")
    bad = next((ch for ch in text if ch != "\t" and unicodedata.category(ch) in _BAD_TEXT_CATEGORIES), None)
    if bad is not None:
        raise ClassValidationError(f"{where} contains a control character (U+{ord(bad):04X})")
    return text


def _dedupe(texts: list[str], max_count: int) -> list[str]:
    out = list(dict.fromkeys(texts))  # first occurrence wins, order kept
    if not out:
        raise ClassValidationError("at least one description is needed")
    if len(out) > max_count:
        raise ClassValidationError(f"{len(out)} descriptions given; the limit is {max_count}")
    return out


def normalize_descriptions(raw: object, *, max_count: int, max_chars: int) -> list[str]:
    """Strip, NFC-normalise, check and de-duplicate descriptions (order kept)."""
    if not isinstance(raw, (list, tuple)):
        raise ClassValidationError("descriptions must be a list of strings")
    if len(raw) > 4 * max_count:  # refuse absurd lists before checking every item
        raise ClassValidationError(f"{len(raw)} descriptions given; the limit is {max_count}")
    texts = [_clean_description(item, f"descriptions[{i}]", max_chars) for i, item in enumerate(raw)]
    return _dedupe(texts, max_count)


def descriptions_from_text(data: bytes, *, max_count: int, max_chars: int) -> list[str]:
    """Descriptions from an uploaded UTF-8 text file: one per line, blank lines skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ClassValidationError(f"the descriptions file is not UTF-8 text (byte {exc.start})") from exc
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) > 4 * max_count:
        raise ClassValidationError(f"{len(lines)} descriptions given; the limit is {max_count}")
    return _dedupe([_clean_description(line, f"line {n}", max_chars) for n, line in lines], max_count)


@dataclass(frozen=True)
class TrainedClasses:
    """What the registry needs about the bundle's trained classes.

    Attributes:
        table: the trained-only `ClassTable`.
        params: head parameters (to build tables for added classes).
        train_counts: `[S]` training images per class.
        anchors: chosen anchor sentences per trained class.
        tiers: `[S]` tier index per class (0 head, 1 medium, 2 tail; see `TIER_NAMES`).
    """

    table: ClassTable
    params: HeadParams
    train_counts: tuple[int, ...]
    anchors: tuple[tuple[str, ...], ...]
    tiers: np.ndarray

    def embeddings(self) -> np.ndarray:
        """`[S, D]` class text directions from the anchors (mask respected)."""
        t = self.table
        return class_directions(t.anchors.reshape(t.num_classes, t.num_anchors, t.embed_dim), t.mask)


@dataclass(frozen=True)
class ServedTable:
    """An immutable class table with its version; swapped as a whole."""

    version: int
    table: ClassTable
    added: tuple[AddedClass, ...]
    tiers: np.ndarray  # [C] int8 index into TIER_NAMES
    embeddings: np.ndarray  # [C, D] unit class text directions
    keys: dict[str, int]  # casefolded name -> class id
    source: tuple[AddedClass, ...] = ()  # the store snapshot's classes it was built from

    @property
    def num_classes(self) -> int:
        return self.table.num_classes


@dataclass(frozen=True)
class DuplicateWarning:
    """An existing class whose text embedding is close to a new class's."""

    name: str
    cosine: float


@dataclass(frozen=True)
class AddOutcome:
    """The result of adding a class."""

    record: AddedClass
    class_id: int | None
    version: int
    near_duplicates: tuple[DuplicateWarning, ...]


class ClassRegistry:
    """Owns the served table, the store and their synchronisation.

    Args:
        trained: the bundle's trained classes.
        encode_texts: text features `[n, D]` for sentences; called on the registry's text thread.
        store: the durable store of added classes.
        sync_interval_s: period of the fallback version check.
        duplicate_threshold: cosine above which a near-duplicate warning is returned.
        metrics: optional.
    """

    def __init__(
        self,
        trained: TrainedClasses,
        encode_texts: Callable[[list[str]], np.ndarray],
        store: ClassStore,
        *,
        sync_interval_s: float = 0.5,
        duplicate_threshold: float = 0.95,
        metrics: Metrics | None = None,
    ) -> None:
        self.trained = trained
        self.store = store
        self._encode_texts = encode_texts
        self.sync_interval_s = sync_interval_s
        self.duplicate_threshold = duplicate_threshold
        self._metrics = metrics
        self._text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlltr-text")
        self._refresh_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._trained_embeddings = trained.embeddings()
        self._trained_keys = {name_key(n): i for i, n in enumerate(trained.table.names)}
        self._current: ServedTable | None = None
        self._notify_task: asyncio.Task[None] | None = None
        self._again = False
        self._closing = False
        self._last_problem = ""
        self.last_sync = 0.0

    # ---- reading -------------------------------------------------------------------------

    @property
    def current(self) -> ServedTable:
        """The table to score against (one atomic read)."""
        table = self._current
        if table is None:
            raise NotReadyError("the class table is not loaded yet; try again shortly")
        return table

    @property
    def loaded(self) -> bool:
        return self._current is not None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the store (raises `StoreUnavailableError` if it cannot be read) and start syncing."""
        await self.refresh(force=True)
        self._tasks = [
            asyncio.create_task(self._poll(), name="vlltr-class-poll"),
            asyncio.create_task(self.store.watch(self._notified), name="vlltr-class-watch"),
        ]

    async def close(self) -> None:
        """Stop syncing and release the store."""
        self._closing = True
        tasks = self._tasks + ([self._notify_task] if self._notify_task is not None else [])
        await cancel_until_done(tasks)
        self._text_pool.shutdown(wait=False, cancel_futures=True)
        await self.store.close()

    def _notified(self) -> None:
        # Called on the loop by the store's watcher. One refresh task at a time; a notification that
        # arrives while it runs makes it go round once more, so no change is missed.
        self._again = True
        if self._notify_task is None or self._notify_task.done():
            self._notify_task = asyncio.get_running_loop().create_task(
                self._refresh_notified(), name="vlltr-class-notified"
            )

    async def _refresh_notified(self) -> None:
        while self._again and not self._closing:
            self._again = False
            await self._refresh_logged()

    async def _poll(self) -> None:
        # A plain sleep (not `wait_for` on an event), and a flag besides the cancellation: a cancellation that
        # lands inside the Redis client can be swallowed there, and the loop must end on shutdown all the same.
        while not self._closing:
            await asyncio.sleep(self.sync_interval_s)
            await self._refresh_logged()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
            self._last_problem = ""
        except StoreUnavailableError as exc:
            # Keep serving the current table; the next tick tries again. Say so once per problem.
            if str(exc) != self._last_problem:
                log.warning(
                    "class store unreadable (%s); serving table version %d until it is back", exc, self.current.version
                )
                self._last_problem = str(exc)
        except Exception:
            log.exception("class table refresh failed; keeping version %s", self.current.version)

    async def refresh(self, *, force: bool = False, at_least: int | None = None) -> ServedTable:
        """Bring the served table up to the store's version (single-flight)."""
        async with self._refresh_lock:
            current = self._current
            if not force and current is not None:
                if at_least is not None and current.version >= at_least:
                    return current
                if at_least is None and await self.store.version() == current.version:
                    self.last_sync = time.monotonic()
                    return current
            snapshot = await self.store.snapshot()
            self.last_sync = time.monotonic()
            if current is not None and snapshot.version == current.version and not force:
                return current
            served = await asyncio.to_thread(self._build, snapshot, current)
            self._current = served  # the atomic swap
            self._report(served)
            if current is None or current.version != served.version:
                log.info(
                    "class table version %d: %d trained + %d added classes",
                    served.version,
                    served.table.num_trained,
                    served.table.num_added,
                )
            return served

    def _build(self, snapshot: StoreSnapshot, prev: ServedTable | None = None) -> ServedTable:
        """The served table for `snapshot`; when it only appends classes to the one `prev` was built from
        (the common case: one class added), `prev` is extended instead of rebuilt."""
        m, d = self.trained.table.num_anchors, self.trained.table.embed_dim
        n = len(prev.source) if prev is not None else 0
        if (
            prev is not None
            and len(snapshot.classes) >= n
            and all(a is b for a, b in zip(snapshot.classes[:n], prev.source))
        ):
            table, keys, kept = prev.table, dict(prev.keys), list(prev.added)
            tiers, embeddings, todo = prev.tiers, prev.embeddings, snapshot.classes[n:]
        else:
            table, keys, kept = self.trained.table, dict(self._trained_keys), []
            tiers, embeddings = self.trained.tiers.astype(np.int8), self._trained_embeddings
            todo = snapshot.classes
        entries: list[ClassEntry] = []
        new: list[AddedClass] = []
        for record in todo:
            if record.key in keys:  # a trained name (or a duplicate) can never be shadowed
                log.warning("ignoring stored class %r: the name is taken", record.name)
                continue
            feats = np.asarray(record.anchor_features, dtype=np.float32)
            if feats.ndim != 2 or feats.shape[1] != d or feats.shape[0] == 0:
                log.warning(
                    "ignoring stored class %r: anchor features of shape %s do not fit [*, %d]",
                    record.name,
                    feats.shape,
                    d,
                )
                continue
            feats = feats[:m]
            anchors = np.zeros((m, d), dtype=np.float32)
            anchors[: feats.shape[0]] = feats
            mask = np.zeros(m, dtype=bool)
            mask[: feats.shape[0]] = True
            keys[record.key] = table.num_classes + len(entries)
            entries.append(ClassEntry(record.name, anchors, mask))
            new.append(record)
        table = table.with_added(entries, self.trained.params)
        tiers = np.concatenate([tiers, np.full(len(new), TIER_NAMES.index("added"), dtype=np.int8)])
        if new:
            embeddings = np.concatenate([embeddings, np.stack([unit_mean(r.anchor_features[:m]) for r in new])])
        return ServedTable(snapshot.version, table, tuple(kept + new), tiers, embeddings, keys, snapshot.classes)

    def _report(self, served: ServedTable) -> None:
        if self._metrics is None:
            return
        self._metrics.class_table_version.set(served.version)
        self._metrics.classes.labels(source="trained").set(served.table.num_trained)
        self._metrics.classes.labels(source="added").set(served.table.num_added)

    # ---- changes -----------------------------------------------------------------------------

    def _check_name_free(self, name: str) -> None:
        key = name_key(name)
        if key in self._trained_keys:
            raise ClassConflictError(f"class {name!r} already exists (a trained class)")
        if key in self.current.keys:
            raise ClassConflictError(f"class {name!r} already exists")

    async def add_class(self, name: str, descriptions: Sequence[str]) -> AddOutcome:
        """Add a class from validated text (see `normalize_name`, `normalize_descriptions`).

        Raises:
            ClassConflictError: the name exists (here or in the store).
            StoreUnavailableError: the store cannot be written now.
        """
        self._check_name_free(name)
        loop = asyncio.get_running_loop()
        # The name, in CLIP's prompts, is what tells a description from a sentence about another class.
        prompts = name_prompts(name)
        texts = list(descriptions) + prompts
        features = await loop.run_in_executor(self._text_pool, self._encode_texts, texts)
        features = np.asarray(features, dtype=np.float32)
        if features.shape[0] != len(texts) or not np.all(np.isfinite(features)):
            raise InferenceFailedError("the text encoder returned unusable features; retry later")
        n = len(descriptions)
        anchors, mask, chosen = build_added_class_anchors(
            features[:n], self.trained.table.num_anchors, reference=features[n:], others=self.current.embeddings
        )
        chosen_feats = anchors[mask]
        record = AddedClass(
            name=name,
            descriptions=tuple(descriptions),
            anchors=tuple(descriptions[int(i)] for i in chosen),
            anchor_features=chosen_feats,
            embedding=unit_mean(chosen_feats),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        warnings = self.near_duplicates(record.embedding)
        version = await self.store.add(record)  # ClassConflictError when another writer took the name first
        served = await self.refresh(at_least=version)
        return AddOutcome(record, served.keys.get(record.key), served.version, warnings)

    def near_duplicates(self, embedding: np.ndarray, limit: int = 5) -> tuple[DuplicateWarning, ...]:
        """Existing classes whose text direction has cosine above the threshold with `embedding`."""
        served = self.current
        cos = served.embeddings @ np.asarray(embedding, dtype=np.float32)
        idx = np.flatnonzero(cos > self.duplicate_threshold)
        idx = idx[np.argsort(-cos[idx], kind="stable")][:limit]
        return tuple(DuplicateWarning(served.table.names[i], round(float(cos[i]), 4)) for i in idx)

    async def remove_class(self, name: str) -> tuple[str, int]:
        """Remove an added class; returns its stored name and the new version.

        Raises:
            TrainedClassError: `name` is a trained class.
            ClassNotFoundError: no such class.
            StoreUnavailableError: the store cannot be written now.
        """
        key = name_key(name)
        if key in self._trained_keys:
            trained_name = self.trained.table.names[self._trained_keys[key]]
            raise TrainedClassError(
                f"class {trained_name!r} is a trained class; only classes added at run time can be deleted"
            )
        current = self.current
        stored = next((r.name for r in current.added if r.key == key), name)
        version = await self.store.remove(name)  # ClassNotFoundError when no added class has the name
        served = await self.refresh(at_least=version)
        return stored, served.version
