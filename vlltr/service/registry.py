"""The class table served right now: trained classes from the bundle plus classes added by text.

- The store (`vlltr.service.store`) holds what was added: records (name, descriptions, who and when) per
  deployment. Everything that depends on the bundle (anchors, their text features, the class direction) is
  derived here and cached in the store per bundle id; a replica on a bundle without it derives it in batches
  before it reports ready (progress in the log and `vlltr_class_derivations_pending`), so model upgrades keep
  every added class, each replica scoring it with its own bundle's features.
- Adding a class: validate, encode its descriptions (and, when there are more than M, its name's prompts) on
  the text thread (at a lower priority than requests), choose its anchors
  (`vlltr.model.runtime.head.build_added_class_anchors`: close to the name, far from every class already
  served), write record and derived data to the store in one atomic step (one winner per name across replicas;
  an identical add is an idempotent success, different descriptions a conflict), then extend the table.
- The table is extended off the request path (in a worker thread) at the cost of what is added, not of the table
  (`ClassTable.with_added` and `_Rows` write into spare rows of shared buffers), and swapped in by ONE reference
  assignment; a batch reads `registry.current` once and is scored entirely against that table.
- Replicas converge: store notifications (Redis pub/sub) trigger a refresh, and a periodic state check
  (`sync_interval_s`) catches anything a notification missed. Changes that continue the served state (same
  epoch, the log starting at the served version and digest) are applied incrementally; another epoch, the
  version going back, another history or a reconnection after the store was away reload everything, and classes
  that disappear that way are named in the log.
- A stored class whose name the bundle trains is not served (the trained class wins) and is listed as
  promoted; a stored entry that cannot be used is quarantined: kept in the store, logged, counted, listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

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
from vlltr.service.store import (
    ClassRecord,
    ClassStore,
    Derived,
    NewClass,
    Quarantined,
    RecordError,
    StoreDelta,
    StoreSnapshot,
    StoreState,
    check_metadata,
    name_key,
)

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


IMPORT_FIELDS = frozenset({"name", "descriptions", "metadata", "added_at", "added_by"})
ADD_FIELDS = frozenset({"name", "descriptions", "metadata"})


def new_class_from_json(data: object, *, max_count: int, max_chars: int, provenance: bool = False) -> NewClassText:
    """A validated class to add from a JSON object: `{name, descriptions, metadata?}`, plus `added_at` and
    `added_by` when `provenance` (an import keeps them). Raises `ClassValidationError` naming the problem."""
    if not isinstance(data, dict):
        raise ClassValidationError("a class must be a JSON object {name, descriptions}")
    allowed = IMPORT_FIELDS if provenance else ADD_FIELDS
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ClassValidationError(f"unexpected field(s) {unknown}; a class has {sorted(allowed)}")
    if "name" not in data:
        raise ClassValidationError("name is missing")
    if "descriptions" not in data:
        raise ClassValidationError("descriptions is missing")
    name = normalize_name(data["name"])
    descriptions = normalize_descriptions(data["descriptions"], max_count=max_count, max_chars=max_chars)
    try:
        metadata = check_metadata(data.get("metadata"))
    except RecordError as exc:
        raise ClassValidationError(str(exc)) from None
    added_at = data.get("added_at") if provenance else None
    added_by = data.get("added_by") if provenance else None
    for field_name, value in (("added_at", added_at), ("added_by", added_by)):
        if value is not None and not isinstance(value, str):
            raise ClassValidationError(f"{field_name} must be a string")
    return NewClassText(name, tuple(descriptions), metadata, added_at or None, added_by or None)


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
class ServedClass:
    """An added class as served: its stored record and what this bundle derived from it."""

    record: ClassRecord
    derived: Derived

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def anchors(self) -> tuple[str, ...]:
        """The chosen anchor sentences, in anchor order."""
        return tuple(self.record.descriptions[i] for i in self.derived.anchors)

    @property
    def descriptions(self) -> tuple[str, ...]:
        return self.record.descriptions


@dataclass(frozen=True)
class Promoted:
    """A stored added class whose name the bundle trains: the trained class is served, the record kept."""

    record: ClassRecord
    trained_id: int


class _Rows:
    """Rows of a per-class array with spare room at the end: a longer view of the same buffer costs only the
    rows appended, and a shorter (older) view never sees them change. Only the newest view may grow in place."""

    def __init__(self, initial: np.ndarray, extra: int) -> None:
        n = initial.shape[0]
        self.buf = np.empty((n + max(extra, 256, (n + extra) // 4), *initial.shape[1:]), dtype=initial.dtype)
        self.buf[:n] = initial
        self.filled = n

    @staticmethod
    def extend(owner: _Rows | None, current: np.ndarray, block: np.ndarray) -> tuple[_Rows, np.ndarray]:
        n, k = current.shape[0], block.shape[0]
        rows = owner
        if rows is None or rows.filled != n or rows.buf.shape[0] < n + k:
            rows = _Rows(current, k)
        rows.buf[n : n + k] = block
        rows.filled = n + k
        return rows, rows.buf[: n + k]


@dataclass(frozen=True)
class ServedTable:
    """An immutable class table with the store state it reflects; swapped as a whole.

    Attributes:
        state: the store state (epoch, version, digest) the table was built from.
        table: the scoring table (trained classes, then `added` in order).
        added: the added classes served, in `seq` order.
        tiers: `[C]` int8 index into `TIER_NAMES`.
        embeddings: `[C, D]` unit class text directions.
        keys: casefolded name -> class id.
        promoted: stored added classes not served because the bundle trains a class of that name.
        quarantined: stored entries that cannot be used, kept in the store.
    """

    state: StoreState
    table: ClassTable
    added: tuple[ServedClass, ...]
    tiers: np.ndarray
    embeddings: np.ndarray
    keys: dict[str, int]
    promoted: tuple[Promoted, ...] = ()
    quarantined: tuple[Quarantined, ...] = ()
    _tier_rows: _Rows | None = field(default=None, repr=False, compare=False)
    _embedding_rows: _Rows | None = field(default=None, repr=False, compare=False)

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def num_classes(self) -> int:
        return self.table.num_classes


@dataclass(frozen=True)
class DuplicateWarning:
    """An existing class whose text embedding is close to a new class's."""

    name: str
    cosine: float


@dataclass(frozen=True)
class NewClassText:
    """One class to add, validated (see `normalize_name`, `normalize_descriptions`, `check_metadata`)."""

    name: str
    descriptions: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    added_at: str | None = None  # kept from an import; now when None
    added_by: str | None = None  # kept from an import; the caller's identity when None


AddStatus = Literal["created", "exists", "conflict", "invalid"]


@dataclass(frozen=True)
class AddOutcome:
    """The result of adding one class.

    Attributes:
        status: `created` (stored now), `exists` (stored before with the same descriptions: an idempotent
            retry), `conflict` (the name is taken by another class) or `invalid`.
        record: the stored record (`created`, `exists`), else None.
        class_id: its id in the served table (None when this replica has not served it yet).
        version: the store version the add is part of (or the served one).
        near_duplicates: existing classes with nearly the same text (`created` only).
        message: why, for `conflict` and `invalid`.
        anchors: the chosen anchor sentences (None when not derived here).
    """

    status: AddStatus
    record: ClassRecord | None
    class_id: int | None
    version: int
    near_duplicates: tuple[DuplicateWarning, ...] = ()
    message: str = ""
    anchors: tuple[str, ...] | None = None


def token_id(token: str | None) -> str:
    """Who added a class: `token:<first 12 hex of sha256(token)>`, or `open` when no admin token is set."""
    if token is None:
        return "open"
    import hashlib

    return "token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def _nice_this_thread() -> None:
    # The text encoder runs when classes are added or derived; requests must keep precedence over it on busy
    # cores, so its thread runs at a lower priority (Linux schedules threads individually).
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class ClassRegistry:
    """Owns the served table, the store and their synchronisation (see the module docstring).

    Args:
        trained: the bundle's trained classes.
        encode_texts: text features `[n, D]` for sentences; called on the registry's text thread.
        store: the deployment's class store.
        bundle_id: the served bundle's id (derived data is cached under it).
        sync_interval_s: period of the state check against the store.
        duplicate_threshold: cosine above which a near-duplicate warning is returned.
        metrics: optional.
        derive_batch: classes encoded per text-encoder call when deriving in bulk.
    """

    def __init__(
        self,
        trained: TrainedClasses,
        encode_texts: Callable[[list[str]], np.ndarray],
        store: ClassStore,
        *,
        bundle_id: str,
        sync_interval_s: float = 0.5,
        duplicate_threshold: float = 0.95,
        metrics: Metrics | None = None,
        derive_batch: int = 64,
    ) -> None:
        self.trained = trained
        self.store = store
        self.bundle_id = bundle_id
        self._encode_texts = encode_texts
        self.sync_interval_s = sync_interval_s
        self.duplicate_threshold = duplicate_threshold
        self.derive_batch = derive_batch
        self._metrics = metrics
        self._text_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="vlltr-text", initializer=_nice_this_thread
        )
        self._refresh_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._trained_embeddings = trained.embeddings()
        self._trained_keys = {name_key(n): i for i, n in enumerate(trained.table.names)}
        self._current: ServedTable | None = None
        self._derived: dict[str, Derived] = {}  # this bundle's derived data by record fingerprint
        self._seen_reconnects = -1
        self._notify_task: asyncio.Task[None] | None = None
        self._again = False
        self._closing = False
        self._last_problem = ""
        self._logged: set[tuple[str, str]] = set()  # (kind, key) said once in the log
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
        """Load the store (raises `StoreUnavailableError` if it cannot be read), deriving what this bundle
        lacks, then start syncing."""
        served = await self.refresh(force=True)
        log.info(
            "class store: %s (epoch %s, version %d); %s",
            self.store.describe(),
            served.state.epoch,
            served.version,
            await self.store.durability(),
        )
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

    def _notified(self, reconnected: bool = False) -> None:
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

    def _served_version(self) -> str:
        table = self._current
        return "none" if table is None else str(table.version)

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
            self._last_problem = ""
        except StoreUnavailableError as exc:
            # Keep serving the current table; the next tick tries again. Say so once per problem.
            if str(exc) != self._last_problem:
                log.warning(
                    "class store unreadable (%s); serving table version %s until it is back",
                    exc,
                    self._served_version(),
                )
                self._last_problem = str(exc)
        except Exception:
            log.exception("class table refresh failed; keeping version %s", self._served_version())

    # ---- synchronisation ---------------------------------------------------------------------

    async def refresh(self, *, force: bool = False) -> ServedTable:
        """Bring the served table to the store's state (single-flight): apply its changes when they continue
        the served state, else reload everything (another epoch, the version going back, another history, a
        reconnection after the store was away)."""
        async with self._refresh_lock:
            current = self._current
            reconnects = self.store.reconnects
            state = await self.store.state()
            self.last_sync = time.monotonic()
            reason = "start" if current is None else "forced" if force else ""
            if not reason and reconnects != self._seen_reconnects:
                reason = "reconnect"
            if current is not None and not reason:
                if state == current.state:
                    return current
                if state.epoch != current.state.epoch:
                    reason = "epoch"
                elif state.version < current.state.version:
                    reason = "rollback"
                else:
                    delta = await self.store.changes_since(current.state)
                    if delta is not None:
                        served = await self._apply_delta(current, delta)
                        return self._publish(current, served, "")
                    reason = "history"
            snapshot = await self.store.snapshot()
            self._seen_reconnects = reconnects
            served = await self._apply_snapshot(current, snapshot)
            return self._publish(current, served, reason)

    def _publish(self, previous: ServedTable | None, served: ServedTable, reason: str) -> ServedTable:
        self._current = served  # the atomic swap
        if reason and reason != "start" and self._metrics is not None:
            self._metrics.class_store_reloads.labels(reason=reason).inc()
        if previous is not None and reason in ("epoch", "rollback", "history", "reconnect"):
            kept = set(served.keys)
            lost = [c.name for c in previous.added if c.key not in kept]
            if lost:
                log.warning(
                    "class store %s: %s (store state %s:%d, was %s:%d); %d added classes are no longer in the store "
                    "and are not served any more: %s",
                    self.store.describe(),
                    _REASONS[reason],
                    served.state.epoch,
                    served.version,
                    previous.state.epoch,
                    previous.version,
                    len(lost),
                    ", ".join(repr(n) for n in lost[:20]) + (" ..." if len(lost) > 20 else ""),
                )
            elif reason != "reconnect":
                log.warning("class store %s: %s; reloaded the class table", self.store.describe(), _REASONS[reason])
        self._report(served)
        if previous is None or previous.state != served.state:
            log.info(
                "class table version %d: %d trained + %d added classes (%d promoted, %d quarantined)",
                served.version,
                served.table.num_trained,
                served.table.num_added,
                len(served.promoted),
                len(served.quarantined),
            )
        return served

    async def _apply_snapshot(self, current: ServedTable | None, snapshot: StoreSnapshot) -> ServedTable:
        records = list(snapshot.records)
        return await self._serve(current, snapshot.state, records, list(snapshot.quarantined), rebuild=True)

    async def _apply_delta(self, current: ServedTable, delta: StoreDelta) -> ServedTable:
        gone = set(delta.removed) | {r.key for r in delta.added} | {q.key for q in delta.quarantined}
        kept_q = [q for q in current.quarantined if q.key not in gone]
        quarantined = kept_q + list(delta.quarantined)
        s = current.table.num_trained
        touched = (
            any(current.keys.get(k, -1) >= s for k in gone)
            or any(p.record.key in gone for p in current.promoted)
            or any(q.key in gone for q in current.quarantined)
        )
        if touched:
            # Something served changed or went away: rebuild from the trained classes (removals are rare).
            records = [c.record for c in current.added if c.key not in gone]
            records += [p.record for p in current.promoted if p.record.key not in gone]
            records = sorted(records + list(delta.added), key=lambda r: r.seq)
            return await self._serve(current, delta.state, records, quarantined, rebuild=True)
        return await self._serve(current, delta.state, list(delta.added), quarantined, rebuild=False)

    async def _serve(
        self,
        current: ServedTable | None,
        state: StoreState,
        records: list[ClassRecord],
        quarantined: list[Quarantined],
        *,
        rebuild: bool,
    ) -> ServedTable:
        """The table for `records` (all of them when `rebuild`, else the ones appended to `current`)."""
        promoted: list[Promoted] = [] if rebuild or current is None else list(current.promoted)
        quarantined = list(quarantined)
        candidates: list[ClassRecord] = []
        for record in records:
            trained_id = self._trained_keys.get(record.key)
            if trained_id is not None:
                promoted.append(Promoted(record, trained_id))
                self._say_once(
                    "promoted",
                    record.key,
                    "added class %r has the name of trained class %r of bundle %s: the trained class is served and "
                    "the added one is kept in the store (listed as promoted)",
                    record.name,
                    self.trained.table.names[trained_id],
                    self.bundle_id,
                )
                continue
            problem = _record_problem(record)
            if problem:
                quarantined.append(Quarantined(record.key, problem, record.dumps()))
                self._say_once("quarantined", record.key, "stored class %r cannot be served: %s", record.name, problem)
                continue
            candidates.append(record)
        if rebuild or current is None:
            prefix: tuple[ServedClass, ...] = ()
            if current is not None:
                # When the served classes are an unchanged prefix of the new list, extend instead of rebuilding.
                n = len(current.added)
                if len(candidates) >= n and all(
                    c.record.key == r.key and c.record.seq == r.seq and c.record.fingerprint == r.fingerprint
                    for c, r in zip(current.added, candidates[:n])
                ):
                    prefix, candidates = current.added, candidates[n:]
            base = current if prefix else None
        else:
            base = current
        taken = base.keys if base is not None else self._trained_keys
        freed = {q.key for q in quarantined}
        fresh: list[ClassRecord] = []
        seen: set[str] = set()
        for record in candidates:
            if (record.key in taken and record.key not in freed) or record.key in seen:
                continue  # stored twice under one key cannot happen; a stale delta entry can
            seen.add(record.key)
            fresh.append(record)
        others = base.embeddings if base is not None else self._trained_embeddings
        derived, failed = await self._derive(fresh, others)
        for record, reason in failed:
            quarantined.append(Quarantined(record.key, reason, record.dumps()))
        served = [ServedClass(r, derived[r.fingerprint]) for r in fresh if r.fingerprint in derived]
        self._report_quarantine(quarantined)
        return await asyncio.to_thread(self._build, base, state, served, tuple(promoted), tuple(quarantined))

    def _say_once(self, kind: str, key: str, message: str, *args: object) -> None:
        if (kind, key) not in self._logged:
            self._logged.add((kind, key))
            log.warning(message, *args)

    def _report_quarantine(self, quarantined: list[Quarantined]) -> None:
        for q in quarantined:
            self._say_once(
                "quarantined", q.key, "class store entry %r is quarantined (kept, not served): %s", q.key, q.reason
            )

    def _build(
        self,
        base: ServedTable | None,
        state: StoreState,
        served: list[ServedClass],
        promoted: tuple[Promoted, ...],
        quarantined: tuple[Quarantined, ...],
    ) -> ServedTable:
        """`base` (or the trained classes) extended by `served`; costs the size of `served`, not of the table."""
        m, d = self.trained.table.num_anchors, self.trained.table.embed_dim
        if base is not None:
            table, keys, kept = base.table, dict(base.keys), base.added
            tiers, embeddings = base.tiers, base.embeddings
            tier_rows, embedding_rows = base._tier_rows, base._embedding_rows
        else:
            table, keys, kept = self.trained.table, dict(self._trained_keys), ()
            tiers, embeddings = self.trained.tiers.astype(np.int8), self._trained_embeddings
            tier_rows = embedding_rows = None
        if not served:
            return ServedTable(
                state, table, kept, tiers, embeddings, keys, promoted, quarantined, tier_rows, embedding_rows
            )
        entries = []
        for i, c in enumerate(served):
            feats = c.derived.features[:m]
            anchors = np.zeros((m, d), dtype=np.float32)
            anchors[: feats.shape[0]] = feats
            mask = np.zeros(m, dtype=bool)
            mask[: feats.shape[0]] = True
            keys[c.key] = table.num_classes + i
            entries.append(ClassEntry(c.name, anchors, mask))
        table = table.with_added(entries, self.trained.params)
        tier_rows, tiers = _Rows.extend(
            tier_rows, tiers, np.full(len(served), TIER_NAMES.index("added"), dtype=np.int8)
        )
        embedding_rows, embeddings = _Rows.extend(
            embedding_rows, embeddings, np.stack([c.derived.embedding for c in served]).astype(np.float32)
        )
        return ServedTable(
            state,
            table,
            kept + tuple(served),
            tiers,
            embeddings,
            keys,
            promoted,
            quarantined,
            tier_rows,
            embedding_rows,
        )

    def _report(self, served: ServedTable) -> None:
        if self._metrics is None:
            return
        self._metrics.class_table_version.set(served.version)
        self._metrics.classes.labels(source="trained").set(served.table.num_trained)
        self._metrics.classes.labels(source="added").set(served.table.num_added)
        self._metrics.class_records.labels(state="served").set(served.table.num_added)
        self._metrics.class_records.labels(state="promoted").set(len(served.promoted))
        self._metrics.class_records.labels(state="quarantined").set(len(served.quarantined))

    # ---- derived data ------------------------------------------------------------------------

    async def _derive(
        self, records: Sequence[ClassRecord], others: np.ndarray, *, cache: bool = True
    ) -> tuple[dict[str, Derived], list[tuple[ClassRecord, str]]]:
        """This bundle's derived data of `records` (in `seq` order): from memory, else the store's cache, else
        computed in batches on the text thread (and, with `cache`, written back to the store's cache).

        Anchors are chosen as an add on this bundle chooses them: against the classes served before (`others`,
        then each earlier record), so a class derived anew scores as if it had been added fresh on this bundle.
        Returns the derived data by fingerprint and the records that could not be derived, with why.

        Raises:
            InferenceFailedError: the text encoder fails on every record (retry later).
            StoreUnavailableError: the store's cache cannot be read.
        """
        m, d = self.trained.table.num_anchors, self.trained.table.embed_dim
        out = {r.fingerprint: self._derived[r.fingerprint] for r in records if r.fingerprint in self._derived}
        missing = [r for r in records if r.fingerprint not in out]
        if missing:
            cached = await self.store.derived(self.bundle_id, [r.fingerprint for r in missing])
            for r in missing:
                entry = cached.get(r.fingerprint)
                if isinstance(entry, Derived) and entry.fits(r, d, m):
                    out[r.fingerprint] = entry
                elif entry is not None:
                    why = entry if isinstance(entry, RecordError) else "it does not fit this bundle"
                    self._say_once(
                        "derived",
                        r.key,
                        "cached derived data of class %r is unusable (%s); deriving it again",
                        r.name,
                        why,
                    )
        todo = [r for r in records if r.fingerprint not in out]
        failed: list[tuple[ClassRecord, str]] = []
        if not todo:
            self._derived.update(out)
            return out, failed
        started = last_said = time.monotonic()
        if len(todo) > 1:
            log.info("deriving %d added classes for bundle %s (text features and anchors)", len(todo), self.bundle_id)
        self._pending(len(todo))
        computed: list[Derived] = []
        # The class directions anchors are chosen against: `others`, then each record in turn (spare rows).
        directions = np.empty((others.shape[0] + len(records), others.shape[1]), dtype=np.float32)
        directions[: others.shape[0]] = others
        filled, position = others.shape[0], 0
        loop = asyncio.get_running_loop()
        for start in range(0, len(todo), self.derive_batch):
            chunk = todo[start : start + self.derive_batch]
            features = dict(
                zip(
                    (r.fingerprint for r in chunk),
                    await loop.run_in_executor(self._text_pool, self._encode_chunk, chunk),
                )
            )
            if all(isinstance(f, str) for f in features.values()) and len(chunk) > 1:
                raise InferenceFailedError("the text encoder fails on every class; retry later")
            while features:
                record = records[position]
                position += 1
                known = out.get(record.fingerprint)
                if known is None:
                    feats = features.pop(record.fingerprint)
                    if isinstance(feats, str):
                        failed.append((record, feats))
                        continue
                    known = self._choose(record, feats, directions[:filled])
                    out[record.fingerprint] = known
                    computed.append(known)
                directions[filled] = known.embedding
                filled += 1
            self._pending(len(todo) - start - len(chunk), len(chunk))
            if time.monotonic() - last_said > 2.0 and start + len(chunk) < len(todo):
                log.info("derived %d of %d added classes for bundle %s", start + len(chunk), len(todo), self.bundle_id)
                last_said = time.monotonic()
        if len(todo) > 1:
            log.info(
                "derived %d added classes for bundle %s in %.1f s%s",
                len(computed),
                self.bundle_id,
                time.monotonic() - started,
                f" ({len(failed)} could not be derived)" if failed else "",
            )
        self._derived.update(out)
        if cache and computed:
            try:
                await self.store.put_derived(self.bundle_id, computed)
            except StoreUnavailableError as exc:
                log.warning(
                    "could not cache derived data in the class store (%s); it is derived again when needed", exc
                )
        return out, failed

    def _pending(self, pending: int, done: int = 0) -> None:
        if self._metrics is not None:
            self._metrics.class_derivations_pending.set(pending)
            if done:
                self._metrics.class_derivations.inc(done)

    def _texts(self, record: ClassRecord) -> list[str]:
        # The name's prompts only matter when there are more descriptions than anchor slots (all are kept else).
        extra = name_prompts(record.name) if len(record.descriptions) > self.trained.table.num_anchors else []
        return list(record.descriptions) + extra

    def _encode_chunk(self, chunk: Sequence[ClassRecord]) -> list[np.ndarray | str]:
        """Text features per record (`[n, D]`), or why they cannot be had. On the text thread."""
        texts = [self._texts(r) for r in chunk]
        try:
            flat = np.asarray(self._encode_texts([t for group in texts for t in group]), dtype=np.float32)
        except Exception as exc:
            if len(chunk) == 1:
                return [f"the text encoder failed on it ({type(exc).__name__}: {exc})"]
            return [f for r in chunk for f in self._encode_chunk([r])]  # find the record that breaks it
        out: list[np.ndarray | str] = []
        pos = 0
        for group in texts:
            feats = flat[pos : pos + len(group)]
            pos += len(group)
            ok = (
                feats.shape[0] == len(group)
                and np.all(np.isfinite(feats))
                and np.all(np.linalg.norm(feats, axis=1) > 0)
            )
            out.append(feats if ok else "the text encoder returned unusable features for it")
        return out

    def _choose(self, record: ClassRecord, feats: np.ndarray, others: np.ndarray) -> Derived:
        n, m = len(record.descriptions), self.trained.table.num_anchors
        reference = feats[n:] if n > m else None
        anchors, mask, chosen = build_added_class_anchors(
            feats[:n], m, reference=reference, others=others if n > m else None
        )
        chosen_feats = anchors[mask]
        return Derived(record.fingerprint, tuple(int(i) for i in chosen), chosen_feats, unit_mean(chosen_feats))

    # ---- changes -----------------------------------------------------------------------------

    def _existing(self, served: ServedTable, key: str) -> ClassRecord | None:
        idx = served.keys.get(key)
        if idx is not None and idx >= served.table.num_trained:
            return served.added[idx - served.table.num_trained].record
        return None

    async def add_class(
        self,
        name: str,
        descriptions: Sequence[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        added_by: str | None = None,
    ) -> AddOutcome:
        """Add one class from validated text; see `add_classes`. Raises `ClassConflictError` for a name that is
        taken by another class (trained, or added with other descriptions)."""
        item = NewClassText(name, tuple(descriptions), dict(metadata or {}), added_by=added_by)
        outcome = (await self.add_classes([item], added_by=added_by))[0]
        if outcome.status == "conflict":
            raise ClassConflictError(outcome.message)
        return outcome

    async def add_classes(self, items: Sequence[NewClassText], *, added_by: str | None = None) -> list[AddOutcome]:
        """Add classes from validated text, each with its own outcome (see `AddOutcome`).

        A name that is taken by a trained class, or by an added class with other descriptions, is a
        `conflict`; an added class with the same descriptions is `exists` (so a retry of an add that succeeded
        succeeds). New classes are derived here (anchors chosen against every class served, and each other in
        order), written to the store in one go, then served; an add the store committed is reported as done
        even when the refresh of this replica's table then fails (the sync loop retries it).

        Raises:
            StoreUnavailableError: the store cannot be written now (nothing was added).
        """
        served = self.current
        outcomes: list[AddOutcome | None] = [None] * len(items)
        fresh: list[tuple[int, ClassRecord]] = []
        seen: dict[str, int] = {}
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for i, item in enumerate(items):
            key = name_key(item.name)
            if key in self._trained_keys:
                trained = self.trained.table.names[self._trained_keys[key]]
                outcomes[i] = AddOutcome(
                    "conflict",
                    None,
                    None,
                    served.version,
                    message=f"class {item.name!r} already exists (trained class {trained!r})",
                )
                continue
            existing = self._existing(served, key)
            if existing is not None:
                outcomes[i] = self._compare(existing, item, served, served.version)
                continue
            if key in seen:
                continue  # decided by the store's answer to the first one
            seen[key] = i
            record = ClassRecord(
                item.name, item.descriptions, item.added_at or now, item.added_by or added_by, dict(item.metadata)
            )
            fresh.append((i, record))
        derived, failed = (
            await self._derive([r for _, r in fresh], served.embeddings, cache=False) if fresh else ({}, [])
        )
        if len(failed) == len(fresh) == 1:
            raise InferenceFailedError(f"cannot encode the descriptions of {fresh[0][1].name!r}: {failed[0][1]}")
        failures = {r.key: why for r, why in failed}
        new = []
        warnings: dict[str, tuple[DuplicateWarning, ...]] = {}
        for i, record in fresh:
            if record.key in failures:
                outcomes[i] = AddOutcome(
                    "invalid", None, None, served.version, message=f"class {record.name!r}: {failures[record.key]}"
                )
            else:
                d = derived[record.fingerprint]
                warnings[record.key] = self._near(served, d.embedding)
                new.append(NewClass(record, self.bundle_id, d))
        results = await self.store.add_many(new) if new else []
        stored: dict[str, tuple[ClassRecord, bool]] = {}
        version = served.version
        for result in results:
            stored[result.record.key if result.record.seq >= 0 else name_key(result.record.name)] = (
                result.record,
                result.created,
            )
            version = max(version, result.state.version)
        refreshed = served
        if any(created for _, created in stored.values()):
            try:
                refreshed = await self.refresh()
            except Exception as exc:
                # Committed: the answer is a success. The sync loop brings this replica's table up to date.
                log.warning("class added to the store, but refreshing this replica's table failed (%s); retrying", exc)
        for i, item in enumerate(items):
            if outcomes[i] is not None:
                continue
            key = name_key(item.name)
            got = stored.get(key)
            if got is None:
                continue
            record, created = got
            if created and seen.get(key) == i:
                d = derived[record.fingerprint]
                anchors = tuple(record.descriptions[j] for j in d.anchors)
                outcomes[i] = AddOutcome(
                    "created", record, refreshed.keys.get(key), version, warnings.get(key, ()), anchors=anchors
                )
            else:
                outcomes[i] = self._compare(record, item, refreshed, version)
        return [
            o if o is not None else AddOutcome("invalid", None, None, version, message="not processed")
            for o in outcomes
        ]

    def _compare(self, existing: ClassRecord, item: NewClassText, served: ServedTable, version: int) -> AddOutcome:
        if existing.seq < 0:
            return AddOutcome(
                "conflict",
                None,
                None,
                version,
                message=f"the name {item.name!r} is taken by a stored record that cannot be read (quarantined); "
                "delete it first",
            )
        if existing.same_class(item.name, item.descriptions):
            idx = served.keys.get(existing.key)
            anchors = None
            if idx is not None and idx >= served.table.num_trained:
                anchors = served.added[idx - served.table.num_trained].anchors
            return AddOutcome("exists", existing, idx, version, anchors=anchors)
        return AddOutcome(
            "conflict",
            existing,
            None,
            version,
            message=f"class {existing.name!r} already exists with other descriptions",
        )

    def _near(self, served: ServedTable, embedding: np.ndarray, limit: int = 5) -> tuple[DuplicateWarning, ...]:
        cos = served.embeddings @ np.asarray(embedding, dtype=np.float32)
        idx = np.flatnonzero(cos > self.duplicate_threshold)
        idx = idx[np.argsort(-cos[idx], kind="stable")][:limit]
        return tuple(DuplicateWarning(served.table.names[i], round(float(cos[i]), 4)) for i in idx)

    def near_duplicates(self, embedding: np.ndarray, limit: int = 5) -> tuple[DuplicateWarning, ...]:
        """Served classes whose text direction has cosine above the threshold with `embedding`."""
        return self._near(self.current, embedding, limit)

    async def remove_class(self, name: str) -> tuple[str, int]:
        """Remove an added class; returns its stored name and the new version.

        A stored added class that a trained class of this bundle shadows (promoted) can be removed too.

        Raises:
            TrainedClassError: `name` is a trained class and no added class of that name is stored.
            ClassNotFoundError: no such class.
            StoreUnavailableError: the store cannot be written now.
        """
        key = name_key(name)
        current = self.current
        promoted = next((p.record for p in current.promoted if p.record.key == key), None)
        if key in self._trained_keys and promoted is None:
            trained_name = self.trained.table.names[self._trained_keys[key]]
            raise TrainedClassError(
                f"class {trained_name!r} is a trained class; only classes added at run time can be deleted"
            )
        record = promoted or self._existing(current, key)
        stored = record.name if record is not None else name
        state = await self.store.remove(key)  # ClassNotFoundError when no added class has the name
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("class removed from the store, but refreshing this replica's table failed (%s); retrying", exc)
        return stored, state.version


_REASONS = {
    "epoch": "the store has another epoch (it was created again: flushed, restored or imported)",
    "rollback": "the store's version went back (restored from an older state)",
    "history": "the store's change history differs from the one served",
    "reconnect": "the store came back after being away",
    "forced": "a reload was asked for",
}


def _record_problem(record: ClassRecord) -> str:
    """Why a stored record cannot be served ('' when it can)."""
    try:
        if normalize_name(record.name) != record.name:
            return "the name is not in normal form"
    except ClassValidationError as exc:
        return f"invalid name: {exc}"
    for text in record.descriptions:
        if any(unicodedata.category(ch) in _BAD_TEXT_CATEGORIES and ch != "\t" for ch in text):
            return "a description contains a control character"
    return ""
