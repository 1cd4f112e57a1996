"""The class store in one local file (the embedded default), safe for several processes on one machine.

Layout: JSON lines, appended to and never rewritten in place, so an add costs the size of the class, not of
the store:

    {"format": "vlltr-class-store", "format_version": 2, "epoch": E, "created": T}     the header
    {"seq": n, "op": "add", "key": K, "fp": F, "digest": D, "record": {...}}           a class added
    {"seq": n, "op": "remove", "key": K, "digest": D}                                  a class removed
    {"op": "derived", "bundle": B, "fp": F, "data": {...}}                             derived data of bundle B
    {"op": "base", "version": n, "digest": D}, {"op": "put", "seq": s, "key": K, "record": {...}},
    {"op": "quarantined", "key": K, "raw": "..."}                                      (after a compaction)

Writers hold an exclusive `flock` on `FILE.lock`, append whole lines in one write and fsync the file before they
return, so an acknowledged add survives a crash or a power loss. A torn last line (a write cut short by a crash,
never acknowledged) is cut off by the next writer. Readers take no lock: each process keeps what it has parsed
and its offset, and reads only what was appended since (a new inode, after a compaction or a restore, makes it
read the file again). When most lines are dead (removed classes, replaced derived data), a writer compacts the
file: the live content is written to a temporary file, fsynced, renamed over the store and the directory is
fsynced; the state (epoch, version, digest) stays the same.

A line that cannot be read is quarantined (kept as it is, listed) and the others are served. A file in the
previous version's layout (one JSON object with per-bundle sections) is migrated on first use; its content is
kept as `FILE.v1`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlltr.errors import ClassNotFoundError, StoreUnavailableError
from vlltr.service.store import (
    EMPTY_DIGEST,
    STORE_FORMAT_VERSION,
    AddResult,
    ClassRecord,
    Derived,
    NewClass,
    Quarantined,
    RecordError,
    StoreDelta,
    StoreSnapshot,
    StoreState,
    new_epoch,
)
from vlltr.service.store_legacy import LegacyData, is_legacy_file, merge_sections, sections_from_file_data

log = logging.getLogger(__name__)

FILE_FORMAT = "vlltr-class-store"
# Compact when more than this many lines are dead and they outnumber the live ones twice.
COMPACT_MIN_DEAD = 1000


def chain_digest(previous: str, seq: int, op: str, key: str, fp: str = "") -> str:
    """The digest after a change: sha1 over the previous digest and the change (the Redis store's Lua does
    the same)."""
    text = f"{previous}\n{seq}\t{op}\t{key}\t{fp}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a file created or renamed in it is there after a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _View:
    """What one process has parsed of the file."""

    inode: int = -1
    offset: int = 0
    lines: int = 0
    epoch: str = ""
    version: int = 0
    digest: str = EMPTY_DIGEST
    base_version: int = 0
    digests: dict[int, str] = field(default_factory=lambda: {0: EMPTY_DIGEST})
    entries: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, op, key), in file order
    records: dict[str, ClassRecord] = field(default_factory=dict)
    quarantined: dict[str, Quarantined] = field(default_factory=dict)
    derived: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # bundle -> fp -> JSON
    live_derived: int = 0

    @property
    def state(self) -> StoreState:
        return StoreState(self.epoch, self.version, self.digest)

    @property
    def dead(self) -> int:
        return self.lines - 1 - len(self.records) - len(self.quarantined) - self.live_derived


class FileClassStore:
    """Added classes in one append-only JSON-lines file (see the module docstring).

    Args:
        path: the store file.
        legacy_path: a previous version's store file to migrate from when `path` does not exist yet (the
            previous default location); a file at `path` in the old layout is migrated in place either way.
    """

    def __init__(self, path: str | Path, *, legacy_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.legacy_path = Path(legacy_path) if legacy_path is not None else None
        self._view = _View()
        self._mutex = threading.Lock()  # one parser of the file per process at a time

    @property
    def reconnects(self) -> int:
        return 0

    def describe(self) -> str:
        return f"class-store file {self.path}"

    async def durability(self) -> str:
        return "each add is fsynced before it is answered: it survives a crash and a power loss"

    # ---- reading (blocking) ------------------------------------------------------------------

    def _unreadable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"cannot read the class store {self.path}: {exc}")

    def _catch_up(self) -> _View:
        """Parse what was appended since the last call (the whole file when it was replaced). Under `_mutex`."""
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            self._view = _View()
            return self._view
        except OSError as exc:
            raise self._unreadable(exc) from exc
        with fh:
            try:
                st = os.fstat(fh.fileno())
                view = self._view
                if view.inode != st.st_ino or st.st_size < view.offset:
                    view = _View(inode=st.st_ino)
                if st.st_size > view.offset:
                    fh.seek(view.offset)
                    data = fh.read(st.st_size - view.offset)
                else:
                    data = b""
            except OSError as exc:
                raise self._unreadable(exc) from exc
        end = data.rfind(b"\n") + 1  # a line still being written (or torn) is read once it is whole
        if end:
            for raw in data[:end].split(b"\n")[:-1]:
                self._parse_line(view, raw)
            view.offset += end
        self._view = view
        return view

    def _parse_line(self, view: _View, raw: bytes) -> None:
        view.lines += 1
        where = f"line {view.lines}"
        text = raw.decode("utf-8", errors="replace")
        if view.lines == 1:
            self._parse_header(view, text)
            return
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            op = obj.get("op")
            if op in ("add", "remove"):
                self._parse_change(view, obj, text)
            elif op == "derived":
                bundle, fp, data = str(obj["bundle"]), str(obj["fp"]), obj["data"]
                section = view.derived.setdefault(bundle, {})
                view.live_derived += fp not in section
                section[fp] = data
            elif op == "put":
                key = str(obj["key"])
                try:
                    view.records[key] = ClassRecord.from_json(obj["record"], seq=int(obj["seq"]))
                except RecordError as exc:
                    view.quarantined[key] = Quarantined(key, str(exc), text)
            elif op == "quarantined":
                key = str(obj["key"])
                view.quarantined[key] = Quarantined(key, str(obj.get("reason", "unreadable")), str(obj["raw"]))
            elif op == "base":
                view.version, view.digest = int(obj["version"]), str(obj["digest"])
                view.base_version = view.version
                view.digests = {view.version: view.digest}
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            reason = f"{where} of {self.path.name} cannot be read ({type(exc).__name__}: {exc})"
            view.quarantined[where] = Quarantined(where, reason, text)
            log.warning("class store: %s; kept in the file and left out", reason)

    def _parse_header(self, view: _View, text: str) -> None:
        try:
            header = json.loads(text)
        except ValueError:
            header = None
        if (
            not isinstance(header, dict)
            or header.get("format") != FILE_FORMAT
            or header.get("format_version") != STORE_FORMAT_VERSION
        ):
            raise StoreUnavailableError(
                f"{self.path} is not a class-store file of format {STORE_FORMAT_VERSION} (its first line should be "
                f'{{"format": "{FILE_FORMAT}", ...}}); move it away or point --class-store elsewhere'
            )
        view.epoch = str(header.get("epoch", ""))

    def _parse_change(self, view: _View, obj: dict[str, Any], text: str) -> None:
        seq, op, key, digest = int(obj["seq"]), str(obj["op"]), str(obj["key"]), str(obj["digest"])
        view.version, view.digest = seq, digest
        view.digests[seq] = digest
        view.entries.append((seq, op, key))
        view.records.pop(key, None)
        view.quarantined.pop(key, None)
        if op == "add":
            try:
                view.records[key] = ClassRecord.from_json(obj.get("record"), seq=seq)
            except RecordError as exc:
                view.quarantined[key] = Quarantined(key, str(exc), text)
                log.warning("class store %s: record %r cannot be read (%s); kept and left out", self.path, key, exc)

    # ---- writing (blocking) ------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_View]:
        """The writer's lock, with the view caught up and the store created (or migrated) if needed."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.lock_path, "a+")
        except OSError as exc:
            raise StoreUnavailableError(f"cannot write the class store {self.path}: {exc}") from exc
        with lock, self._mutex:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                self._create_or_migrate()
                yield self._catch_up()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _create_or_migrate(self) -> None:
        """Under the lock: make sure `path` is a store file of this format (creating or migrating it)."""
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(64)
        except FileNotFoundError:
            head = None
        except OSError as exc:
            raise self._unreadable(exc) from exc
        if head:
            if head.lstrip().startswith(b'{"format":'):
                return
            text = self.path.read_text(encoding="utf-8", errors="replace")
            data = is_legacy_file(text)
            if data is None:
                self._parse_header(_View(), text.split("\n", 1)[0])  # raises: not a store file
                return
            self._migrate(merge_sections(sections_from_file_data(data)), keep_old=True)
            return
        legacy = LegacyData()
        if self.legacy_path is not None and self.legacy_path.exists():
            data = is_legacy_file(self.legacy_path.read_text(encoding="utf-8", errors="replace"))
            if data is not None:
                legacy = merge_sections(sections_from_file_data(data))
                log.info("class store: migrating %d classes from %s", len(legacy.records), self.legacy_path)
        self._migrate(legacy, keep_old=False)

    def _migrate(self, legacy: LegacyData, *, keep_old: bool) -> None:
        for problem in legacy.problems:
            log.warning("class store migration: %s", problem)
        lines = [self._header(new_epoch())]
        digest = EMPTY_DIGEST
        for seq, record in enumerate(legacy.records, start=1):
            digest = chain_digest(digest, seq, "add", record.key, record.fingerprint)
            lines.append(_add_line(seq, record, digest))
        for bundle_id, items in legacy.derived.items():
            lines.extend(_derived_line(bundle_id, d) for d in items)
        if keep_old:
            backup = _free_name(self.path.with_name(self.path.name + ".v1"))
            os.link(self.path, backup)  # the old content stays, under FILE.v1
            log.warning(
                "class store %s was in the previous layout: migrated %d classes; the old file is kept as %s",
                self.path,
                len(legacy.records),
                backup,
            )
        self._replace_with(lines)

    def _header(self, epoch: str) -> str:
        return json.dumps(
            {"format": FILE_FORMAT, "format_version": STORE_FORMAT_VERSION, "epoch": epoch, "created": _now()}
        )

    def _replace_with(self, lines: Sequence[str]) -> None:
        """Write `lines` to a temporary file, fsync it, rename it over the store, fsync the directory."""
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.path.parent)

    def _append(self, view: _View, lines: Sequence[str], *, sync: bool = True) -> None:
        """Append whole lines in one write (cutting off a torn last line first) and fsync."""
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot write the class store {self.path}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size > view.offset:
                log.warning(
                    "class store %s: cutting off %d bytes of a torn last line (a write cut short, never acknowledged)",
                    self.path,
                    size - view.offset,
                )
                os.ftruncate(fd, view.offset)
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot write the class store {self.path}: {exc}") from exc
        finally:
            os.close(fd)

    def _add_many_sync(self, items: Sequence[NewClass]) -> list[AddResult]:
        with self._locked() as view:
            version, digest = view.version, view.digest
            lines: list[str] = []
            taken: dict[str, ClassRecord] = {}
            results: list[tuple[ClassRecord, bool]] = []
            for item in items:
                record = item.record
                existing = taken.get(record.key) or view.records.get(record.key)
                if existing is not None:
                    results.append((existing, False))
                    continue
                version += 1
                digest = chain_digest(digest, version, "add", record.key, record.fingerprint)
                stored = ClassRecord(
                    record.name, record.descriptions, record.added_at, record.added_by, record.metadata, version
                )
                lines.append(_add_line(version, stored, digest))
                if item.derived is not None and item.bundle_id is not None:
                    lines.append(_derived_line(item.bundle_id, item.derived))
                taken[record.key] = stored
                results.append((stored, True))
            if lines:
                self._append(view, lines)
                view = self._catch_up()
                self._maybe_compact(view)
            state = StoreState(view.epoch, version, digest)
            return [AddResult(record, created, state) for record, created in results]

    def _remove_sync(self, key: str) -> StoreState:
        with self._locked() as view:
            if key not in view.records and key not in view.quarantined:
                raise ClassNotFoundError(f"no added class named {key!r}")
            version = view.version + 1
            digest = chain_digest(view.digest, version, "remove", key)
            self._append(view, [json.dumps({"seq": version, "op": "remove", "key": key, "digest": digest})])
            view = self._catch_up()
            self._maybe_compact(view)
            return view.state

    def _put_derived_sync(self, bundle_id: str, items: Sequence[Derived]) -> None:
        if not items:
            return
        with self._locked() as view:
            # A cache: recomputed when lost, so it is not worth an fsync of its own.
            self._append(view, [_derived_line(bundle_id, d) for d in items], sync=False)
            self._catch_up()

    def _maybe_compact(self, view: _View) -> None:
        live = len(view.records) + len(view.quarantined) + view.live_derived
        if view.dead < COMPACT_MIN_DEAD or view.dead < 2 * live:
            return
        self.compact()

    def compact(self) -> None:
        """Rewrite the file with only its live content (same epoch, version and digest). Blocking; call it with
        the writer's lock held (`add_many` and `remove` do when most lines are dead)."""
        view = self._catch_up()
        fps = {r.fingerprint for r in view.records.values()}
        lines = [self._header(view.epoch), json.dumps({"op": "base", "version": view.version, "digest": view.digest})]
        for record in sorted(view.records.values(), key=lambda r: r.seq):
            put = {"op": "put", "seq": record.seq, "key": record.key, "record": record.to_json()}
            lines.append(json.dumps(put, ensure_ascii=False, separators=(",", ":")))
        for q in view.quarantined.values():
            lines.append(json.dumps({"op": "quarantined", "key": q.key, "reason": q.reason, "raw": q.raw}))
        for bundle_id, section in view.derived.items():
            for fp, data in section.items():
                if fp in fps:
                    lines.append(json.dumps({"op": "derived", "bundle": bundle_id, "fp": fp, "data": data}))
        self._replace_with(lines)
        log.info("class store %s compacted: %d lines dead of %d", self.path, view.dead, view.lines)
        self._catch_up()

    def _ensure_sync(self) -> _View:
        with self._mutex:
            view = self._catch_up()
        if view.lines == 0 or not view.epoch:
            with self._locked() as created:
                return created
        return view

    # ---- the protocol ------------------------------------------------------------------------

    def _state_sync(self) -> StoreState:
        return self._ensure_sync().state

    def _snapshot_sync(self) -> StoreSnapshot:
        self._ensure_sync()
        with self._mutex:
            view = self._catch_up()
            records = tuple(sorted(view.records.values(), key=lambda r: r.seq))
            return StoreSnapshot(view.state, records, tuple(view.quarantined.values()))

    def _changes_sync(self, base: StoreState) -> StoreDelta | None:
        with self._mutex:
            view = self._catch_up()
            if base.epoch != view.epoch or view.digests.get(base.version) != base.digest:
                return None
            start = bisect.bisect_right(view.entries, base.version, key=lambda e: e[0])  # entries are in seq order
            touched = [(op, key) for _, op, key in view.entries[start:]]
            keys = list(dict.fromkeys(key for _, key in touched))
            removed = tuple(dict.fromkeys(key for op, key in touched if op == "remove"))
            added = sorted(
                (view.records[k] for k in keys if k in view.records and view.records[k].seq > base.version),
                key=lambda r: r.seq,
            )
            quarantined = tuple(view.quarantined[k] for k in keys if k in view.quarantined)
            return StoreDelta(base, view.state, tuple(added), removed, quarantined)

    def _derived_sync(self, bundle_id: str, fingerprints: Sequence[str]) -> dict[str, Derived | RecordError]:
        with self._mutex:
            section = self._catch_up().derived.get(bundle_id, {})
            found = {fp: section[fp] for fp in fingerprints if fp in section}
        out: dict[str, Derived | RecordError] = {}
        for fp in fingerprints:
            data = found.get(fp)
            if data is None:
                continue
            try:
                out[fp] = Derived.from_json(data)
            except RecordError as exc:
                out[fp] = exc
        return out

    async def state(self) -> StoreState:
        return await asyncio.to_thread(self._state_sync)

    async def snapshot(self) -> StoreSnapshot:
        return await asyncio.to_thread(self._snapshot_sync)

    async def changes_since(self, base: StoreState) -> StoreDelta | None:
        return await asyncio.to_thread(self._changes_sync, base)

    async def add_many(self, items: Sequence[NewClass]) -> list[AddResult]:
        return await asyncio.to_thread(self._add_many_sync, list(items))

    async def remove(self, key: str) -> StoreState:
        return await asyncio.to_thread(self._remove_sync, key)

    async def derived(self, bundle_id: str, fingerprints: Sequence[str]) -> dict[str, Derived | RecordError]:
        return await asyncio.to_thread(self._derived_sync, bundle_id, list(fingerprints))

    async def put_derived(self, bundle_id: str, items: Sequence[Derived]) -> None:
        await asyncio.to_thread(self._put_derived_sync, bundle_id, list(items))

    async def watch(self, on_change: Callable[[bool], None]) -> None:
        # No push channel for a file: the registry's periodic state check is the notification.
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


def _add_line(seq: int, record: ClassRecord, digest: str) -> str:
    line: dict[str, Any] = {"seq": seq, "op": "add", "key": record.key, "fp": record.fingerprint, "digest": digest}
    line["record"] = record.to_json()
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def _derived_line(bundle_id: str, derived: Derived) -> str:
    line = {"op": "derived", "bundle": bundle_id, "fp": derived.fingerprint, "data": derived.to_json()}
    return json.dumps(line, separators=(",", ":"))


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
