"""Durable stores of the classes added at run time: Redis (shared by replicas) or a local JSON file.

Both keep, per bundle id, the added classes (name, descriptions, chosen anchor sentences and their text
features, the class's text embedding) and a version counter that every change bumps. Adds are atomic
check-and-set: when two writers race to add the same name, exactly one wins and the other gets
`ClassConflictError`.

Redis layout (`P` = the key prefix, `B` = the bundle id):
    P:classes:B           hash   casefolded name -> JSON record
    P:classes:B:version   string the version counter
    P:classes:B:events    pub/sub channel; each change publishes the new version
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlltr.errors import ClassConflictError, ClassNotFoundError, StoreUnavailableError
from vlltr.service.redis_link import RedisLink, make_client

log = logging.getLogger(__name__)

FILE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class AddedClass:
    """A class added by text, as stored.

    Attributes:
        name: display name (NFC-normalised).
        descriptions: every description given.
        anchors: the chosen anchor sentences (a subset of `descriptions`), in anchor order.
        anchor_features: `[m, D]` float32 raw text features of `anchors`.
        embedding: `[D]` float32 unit vector summarising the class text (near-duplicate checks).
        created: ISO-8601 UTC time of the add.
        seq: the store version at which it was added (orders added classes identically on every replica).
    """

    name: str
    descriptions: tuple[str, ...]
    anchors: tuple[str, ...]
    anchor_features: np.ndarray = field(repr=False, compare=False)
    embedding: np.ndarray = field(repr=False, compare=False)
    created: str = ""
    seq: int = 0

    @property
    def key(self) -> str:
        """The uniqueness key (case-insensitive)."""
        return name_key(self.name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (arrays as base64 float32), without `seq` (the store assigns it)."""
        return {
            "name": self.name,
            "descriptions": list(self.descriptions),
            "anchors": list(self.anchors),
            "anchor_features": _encode_array(self.anchor_features),
            "embedding": _encode_array(self.embedding),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], seq: int | None = None) -> AddedClass:
        """Inverse of `to_json`; `seq` from the record unless given."""
        return cls(
            name=str(data["name"]),
            descriptions=tuple(data["descriptions"]),
            anchors=tuple(data["anchors"]),
            anchor_features=_decode_array(data["anchor_features"]),
            embedding=_decode_array(data["embedding"]),
            created=str(data.get("created", "")),
            seq=int(data.get("seq", 0) if seq is None else seq),
        )


def name_key(name: str) -> str:
    """Case-insensitive identity of a class name."""
    return name.casefold()


def _encode_array(arr: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return {"shape": list(arr.shape), "f32": base64.b64encode(arr.tobytes()).decode("ascii")}


def _decode_array(data: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(data["f32"])
    arr = np.frombuffer(raw, dtype=np.float32).reshape(data["shape"])
    return arr


@dataclass(frozen=True)
class StoreSnapshot:
    """A consistent read: the version and the added classes in `seq` order."""

    version: int
    classes: tuple[AddedClass, ...]


class ClassStore(Protocol):
    """What the registry needs from a store. Every method may raise `StoreUnavailableError`."""

    async def snapshot(self) -> StoreSnapshot:
        """Version and classes, read atomically."""

    async def version(self) -> int:
        """The current version (cheap; polled)."""

    async def add(self, record: AddedClass) -> int:
        """Store a new class; returns the new version. Raises `ClassConflictError`."""

    async def remove(self, name: str) -> int:
        """Delete an added class; returns the new version. Raises `ClassNotFoundError`."""

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` whenever another writer changes the store (returns when cancelled)."""

    async def close(self) -> None:
        """Release resources."""


class _DecodedRecords:
    """Records decoded in earlier snapshots, by `(key, seq)`. A stored record never changes (adding a name
    again gives it a new seq), so a snapshot decodes only what is new; unchanged classes come back as the
    same objects, which lets the registry extend its table instead of rebuilding it."""

    def __init__(self) -> None:
        self._by_id: dict[tuple[str, int], AddedClass] = {}

    def snapshot(self, version: int, records: list[dict[str, Any]]) -> StoreSnapshot:
        known, fresh = self._by_id, {}
        for r in records:
            rid = (name_key(str(r.get("name", ""))), int(r.get("seq", 0)))
            fresh[rid] = known.get(rid) or AddedClass.from_json(r)
        self._by_id = fresh  # one assignment: a concurrent snapshot at worst decodes again
        classes = sorted(fresh.values(), key=lambda c: (c.seq, c.key))
        return StoreSnapshot(version=version, classes=tuple(classes))


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

# Add: refuse an existing field, bump the version, stamp the record with it, notify. Atomic in Redis.
_ADD_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], '{"seq":' .. v .. ',' .. string.sub(ARGV[2], 2))
redis.call('PUBLISH', KEYS[3], v)
return v
"""
_REMOVE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return -1 end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], v)
return v
"""


class RedisClassStore:
    """Added classes in Redis, shared by every replica serving the same bundle id."""

    def __init__(self, link: RedisLink, *, prefix: str, bundle_id: str) -> None:
        self.link = link
        base = f"{prefix}:classes:{bundle_id}"
        self.hash_key = base
        self.version_key = f"{base}:version"
        self.channel = f"{base}:events"
        self._add = link.client.register_script(_ADD_LUA)
        self._remove = link.client.register_script(_REMOVE_LUA)
        self._decoded = _DecodedRecords()

    def _unavailable(self, exc: BaseException | None = None) -> StoreUnavailableError:
        if exc is not None:
            self.link.failed(exc)
        return StoreUnavailableError("the class store (Redis) is unavailable; try again shortly")

    async def snapshot(self) -> StoreSnapshot:
        try:
            async with self.link.client.pipeline(transaction=True) as pipe:
                pipe.get(self.version_key)
                pipe.hgetall(self.hash_key)
                raw_version, raw_classes = await pipe.execute()
        except Exception as exc:
            raise self._unavailable(exc) from exc
        self.link.succeeded()
        records = [json.loads(v) for v in raw_classes.values()]
        return self._decoded.snapshot(int(raw_version or 0), records)

    async def version(self) -> int:
        if not self.link.available():
            raise self._unavailable()
        try:
            raw = await self.link.client.get(self.version_key)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        return int(raw or 0)

    async def add(self, record: AddedClass) -> int:
        payload = json.dumps(record.to_json(), separators=(",", ":"))
        try:
            result = await self._add(keys=[self.hash_key, self.version_key, self.channel], args=[record.key, payload])
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if int(result) < 0:
            raise ClassConflictError(f"class {record.name!r} already exists")
        return int(result)

    async def remove(self, name: str) -> int:
        try:
            result = await self._remove(keys=[self.hash_key, self.version_key, self.channel], args=[name_key(name)])
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if int(result) < 0:
            raise ClassNotFoundError(f"no added class named {name!r}")
        return int(result)

    async def watch(self, on_change: Callable[[], None]) -> None:
        # A dedicated connection without a read timeout: a subscription is idle most of the time.
        client = make_client(self.link.url, None, self.link.retry_s)
        try:
            while True:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(self.channel)
                    on_change()  # changes made while we were not subscribed
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            on_change()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("class-store subscription lost (%s); resubscribing", exc)
                    await asyncio.sleep(self.link.retry_s)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis leaves PubSub.aclose unannotated
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Local file
# ---------------------------------------------------------------------------------------------


class FileClassStore:
    """Added classes in one JSON file, safe for several processes on one machine.

    Writers hold an exclusive `flock` on `<file>.lock` for the read-modify-write and replace the file by
    an atomic rename, so readers (which take no lock) always see a whole file. The file holds a section per
    bundle id: `{"format_version": 1, "bundles": {B: {"version": n, "classes": {key: record}}}}`.
    """

    def __init__(self, path: str | Path, *, bundle_id: str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.bundle_id = bundle_id
        self._decoded = _DecodedRecords()
        # The file's parsed content and the (mtime, size, inode) it was read or written at: while the file
        # is unchanged nothing is re-read. Never mutated in place (readers in other threads may hold it).
        self._parsed: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    # Blocking helpers (run in a worker thread).

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read the class store {self.path}: {exc}") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_all(self) -> dict[str, Any]:
        stamp = self._stamp()
        if stamp is None:
            return {"format_version": FILE_FORMAT_VERSION, "bundles": {}}
        parsed = self._parsed
        if parsed is not None and parsed[0] == stamp:
            return parsed[1]
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format_version": FILE_FORMAT_VERSION, "bundles": {}}
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read the class store {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreUnavailableError(
                f"the class store {self.path} is not valid JSON ({exc}); fix or remove it"
            ) from exc
        if not isinstance(data, dict) or data.get("format_version") != FILE_FORMAT_VERSION:
            raise StoreUnavailableError(
                f"the class store {self.path} has an unknown format (expected format_version {FILE_FORMAT_VERSION})"
            )
        if not isinstance(data.get("bundles"), dict):
            data["bundles"] = {}
        # A replace between the stat and the read leaves an older stamp: the next call re-reads.
        self._parsed = (stamp, data)
        return data

    def _section(self, data: dict[str, Any]) -> dict[str, Any]:
        return data["bundles"].get(self.bundle_id) or {"version": 0, "classes": {}}

    def _with_section(self, data: dict[str, Any], version: int, classes: dict[str, Any]) -> dict[str, Any]:
        """A new file content with this bundle's section replaced (the others shared, not copied)."""
        return {**data, "bundles": {**data["bundles"], self.bundle_id: {"version": version, "classes": classes}}}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write_all(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        stamp = self._stamp()
        self._parsed = None if stamp is None else (stamp, data)

    def _snapshot_sync(self) -> StoreSnapshot:
        section = self._section(self._read_all())
        return self._decoded.snapshot(int(section["version"]), list(section["classes"].values()))

    def _version_sync(self) -> int:
        return int(self._section(self._read_all())["version"])

    def _add_sync(self, record: AddedClass) -> int:
        with self._locked():
            data = self._read_all()
            section = self._section(data)
            if record.key in section["classes"]:
                raise ClassConflictError(f"class {record.name!r} already exists")
            version = int(section["version"]) + 1
            classes = {**section["classes"], record.key: {"seq": version, **record.to_json()}}
            self._write_all(self._with_section(data, version, classes))
            return version

    def _remove_sync(self, name: str) -> int:
        with self._locked():
            data = self._read_all()
            section = self._section(data)
            if name_key(name) not in section["classes"]:
                raise ClassNotFoundError(f"no added class named {name!r}")
            version = int(section["version"]) + 1
            classes = {k: v for k, v in section["classes"].items() if k != name_key(name)}
            self._write_all(self._with_section(data, version, classes))
            return version

    # Async interface.

    async def snapshot(self) -> StoreSnapshot:
        return await asyncio.to_thread(self._snapshot_sync)

    async def version(self) -> int:
        return await asyncio.to_thread(self._version_sync)

    async def add(self, record: AddedClass) -> int:
        return await asyncio.to_thread(self._add_sync, record)

    async def remove(self, name: str) -> int:
        return await asyncio.to_thread(self._remove_sync, name)

    async def watch(self, on_change: Callable[[], None]) -> None:
        # No push channel for a file: the registry's periodic version check is the notification.
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None
