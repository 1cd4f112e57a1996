"""What the class stores keep and promise: added classes per deployment, derived data per bundle.

A **class record** is the source of truth of a class added by text: its name, its descriptions, when and by
whom (a token id, never the token) it was added, and optional user metadata. Records belong to the
deployment (the Redis key prefix, or the class-store file), never to a model bundle, so a model upgrade keeps
every added class.

What a class needs to be scored depends on the bundle: the chosen anchor sentences, their text features and
the class's text direction. That is **derived data**, cached in the store per bundle id and keyed by the
record's fingerprint (name and descriptions); a replica on a bundle without it computes it (in batches, before
it reports ready) and writes it back, so replicas on the same bundle compute it once.

Every change (an add or a remove) bumps the store's **version** and extends its **digest** (a hash chain over
the changes). The store also carries an **epoch**: a random id set when the store is created (or created
again: after a flush, or an import into an empty store). A replica compares `StoreState` (epoch, version,
digest) with what it serves: the same state means the same content; a later version whose change log starts
at the replica's own state is applied incrementally; anything else (another epoch, the version going back, a
digest that does not match, a log trimmed past the replica's version, a reconnection after the store was
away) reloads the whole table.

A record or derived entry that cannot be read is **quarantined**: kept in the store untouched, logged,
counted and listed, and never blocks the other classes.

Implementations: `vlltr.service.store_redis.RedisClassStore` (shared by replicas) and
`vlltr.service.store_file.FileClassStore` (one machine). Data written by the previous version (classes kept per
bundle id) is migrated on first use: `vlltr.service.store_legacy`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vlltr.errors import StoredRecordError

RecordError = StoredRecordError  # a stored entry that cannot be read: quarantined

STORE_FORMAT_VERSION = 2
EMPTY_DIGEST = "0"
MAX_METADATA_BYTES = 4096
RECORD_FIELDS = ("name", "descriptions", "added_at", "added_by", "metadata")


def name_key(name: str) -> str:
    """Case-insensitive identity of a class name."""
    return name.casefold()


def fingerprint(name: str, descriptions: Sequence[str]) -> str:
    """Identity of what derived data is computed from: the name (its prompts choose anchors) and descriptions."""
    blob = json.dumps([name, list(descriptions)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def check_metadata(metadata: object) -> dict[str, Any]:
    """User metadata: a JSON object of at most `MAX_METADATA_BYTES` serialised; raises `RecordError`."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise RecordError("metadata must be a JSON object with string keys")
    try:
        size = len(json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise RecordError(f"metadata is not plain JSON ({type(exc).__name__})") from None
    if size > MAX_METADATA_BYTES:
        raise RecordError(f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return dict(metadata)


@dataclass(frozen=True)
class ClassRecord:
    """A class added by text, as stored (the source of truth).

    Attributes:
        name: display name (NFC-normalised when it was added).
        descriptions: every description given, in order.
        added_at: ISO-8601 UTC time of the add.
        added_by: who added it: `token:<id>` (a hash of the admin token), `open` (no token configured) or what
            an import recorded; None when unknown.
        metadata: the user's JSON object (may be empty).
        seq: the store version at which it was added (orders added classes identically on every replica).
    """

    name: str
    descriptions: tuple[str, ...]
    added_at: str = ""
    added_by: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)
    seq: int = 0

    @property
    def key(self) -> str:
        """The uniqueness key (case-insensitive)."""
        return name_key(self.name)

    @property
    def fingerprint(self) -> str:
        """What the derived data of this record is computed from."""
        return fingerprint(self.name, self.descriptions)

    def same_class(self, name: str, descriptions: Sequence[str]) -> bool:
        """Whether an add of `name` with `descriptions` asks for exactly this class (an idempotent retry)."""
        return name_key(name) == self.key and tuple(descriptions) == self.descriptions

    def to_json(self) -> dict[str, Any]:
        """The stored JSON object, without `seq` (the store assigns it)."""
        return {
            "name": self.name,
            "descriptions": list(self.descriptions),
            "added_at": self.added_at,
            "added_by": self.added_by,
            "metadata": dict(self.metadata),
        }

    def dumps(self) -> str:
        """`to_json` as compact JSON text."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: object, *, seq: int | None = None) -> ClassRecord:
        """Read a stored record; raises `RecordError` naming what is wrong."""
        if not isinstance(data, dict):
            raise RecordError("the record is not a JSON object")
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RecordError("the record has no name")
        descriptions = data.get("descriptions")
        if (
            not isinstance(descriptions, list)
            or not descriptions
            or not all(isinstance(d, str) and d.strip() for d in descriptions)
        ):
            raise RecordError(f"record {name!r}: descriptions must be a non-empty list of non-empty strings")
        added_by = data.get("added_by")
        raw_seq = data.get("seq", 0) if seq is None else seq
        if not isinstance(raw_seq, int) or isinstance(raw_seq, bool) or raw_seq < 0:
            raise RecordError(f"record {name!r}: seq must be a non-negative integer")
        return cls(
            name=name,
            descriptions=tuple(descriptions),
            # Records of the previous version call the time `created`.
            added_at=str(data.get("added_at") or data.get("created") or ""),
            added_by=added_by if isinstance(added_by, str) else None,
            metadata=_metadata_or_error(data.get("metadata"), name),
            seq=raw_seq,
        )

    @classmethod
    def loads(cls, text: str | bytes, *, seq: int | None = None) -> ClassRecord:
        """`from_json` of JSON text; raises `RecordError`."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RecordError(f"not valid JSON ({exc})") from None
        return cls.from_json(data, seq=seq)


def _metadata_or_error(metadata: object, name: str) -> dict[str, Any]:
    try:
        return check_metadata(metadata)
    except RecordError as exc:
        raise RecordError(f"record {name!r}: {exc}") from None


@dataclass(frozen=True)
class Derived:
    """What one bundle derives from a record: the chosen anchors and their text features.

    Attributes:
        fingerprint: the record's fingerprint (name and descriptions) it was computed from.
        anchors: indices into the record's descriptions, in anchor order.
        features: `[m, D]` float32 raw text features of those descriptions.
        embedding: `[D]` float32 unit text direction of the class (near-duplicate checks, anchor choice).
    """

    fingerprint: str
    anchors: tuple[int, ...]
    features: np.ndarray = field(repr=False, compare=False)
    embedding: np.ndarray = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (arrays as base64 float32)."""
        return {
            "fp": self.fingerprint,
            "anchors": list(self.anchors),
            "features": encode_array(self.features),
            "embedding": encode_array(self.embedding),
        }

    def dumps(self) -> str:
        """`to_json` as compact JSON text."""
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: object) -> Derived:
        """Read a derived entry; raises `RecordError`."""
        if not isinstance(data, dict):
            raise RecordError("the derived entry is not a JSON object")
        try:
            features = decode_array(data["features"])
            embedding = decode_array(data["embedding"])
            anchors = tuple(int(i) for i in data["anchors"])
            fp = str(data["fp"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"the derived entry is malformed ({type(exc).__name__}: {exc})") from None
        if features.ndim != 2 or features.shape[0] != len(anchors) or embedding.shape != (features.shape[1],):
            raise RecordError(f"the derived entry's arrays do not fit ({features.shape}, {embedding.shape})")
        if not (np.all(np.isfinite(features)) and np.all(np.isfinite(embedding))):
            raise RecordError("the derived entry holds non-finite values")
        return cls(fp, anchors, features, embedding)

    @classmethod
    def loads(cls, text: str | bytes) -> Derived:
        """`from_json` of JSON text; raises `RecordError`."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RecordError(f"not valid JSON ({exc})") from None
        return cls.from_json(data)

    def fits(self, record: ClassRecord, embed_dim: int, num_anchors: int) -> bool:
        """Whether this entry can score `record` in a table of `embed_dim` and `num_anchors`."""
        return (
            self.fingerprint == record.fingerprint
            and self.features.shape[1] == embed_dim
            and 0 < len(self.anchors) <= num_anchors
            and all(0 <= i < len(record.descriptions) for i in self.anchors)
        )


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """A float32 array as `{"shape", "f32": base64}`."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return {"shape": list(arr.shape), "f32": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_array(data: Mapping[str, Any]) -> np.ndarray:
    """Inverse of `encode_array`; raises ValueError (or KeyError, TypeError) on malformed input."""
    raw = base64.b64decode(data["f32"], validate=True)
    shape = [int(s) for s in data["shape"]]
    if len(raw) != 4 * math.prod(shape):
        raise ValueError(f"{len(raw)} bytes for shape {shape}")
    return np.frombuffer(raw, dtype=np.float32).reshape(shape)


@dataclass(frozen=True)
class Quarantined:
    """A stored entry that cannot be read: kept in the store as it is, left out of the table.

    Attributes:
        key: the record's key (or `line N` of a class-store file).
        reason: why it cannot be used.
        raw: the stored text (exported with the rest, so a backup loses nothing).
    """

    key: str
    reason: str
    raw: str = field(default="", repr=False)


@dataclass(frozen=True)
class StoreState:
    """Where a store is: its epoch, its version and the digest of its change history."""

    epoch: str
    version: int
    digest: str


@dataclass(frozen=True)
class StoreSnapshot:
    """A consistent read of a whole store: its state, the records in `seq` order, what is quarantined."""

    state: StoreState
    records: tuple[ClassRecord, ...]
    quarantined: tuple[Quarantined, ...] = ()


@dataclass(frozen=True)
class StoreDelta:
    """The changes from `base` (a state the reader had) to `state`, read atomically.

    `added` holds the records added since (in `seq` order), `removed` the keys removed since; a key removed and
    added again appears in both.
    """

    base: StoreState
    state: StoreState
    added: tuple[ClassRecord, ...]
    removed: tuple[str, ...]
    quarantined: tuple[Quarantined, ...] = ()


@dataclass(frozen=True)
class NewClass:
    """A class to add: the record, and (optionally) derived data for the writer's bundle, stored with it."""

    record: ClassRecord
    bundle_id: str | None = None
    derived: Derived | None = None


@dataclass(frozen=True)
class AddResult:
    """What the store did with one `NewClass`: `created`, or an existing record under the name (`record`)."""

    record: ClassRecord
    created: bool
    state: StoreState


class ClassStore(Protocol):
    """What the registry and the export/import commands need from a store.

    Every method may raise `StoreUnavailableError` (the store cannot be reached or read right now).
    """

    @property
    def reconnects(self) -> int:
        """How many times the store came back after being unreachable (a reader reloads when it changes)."""

    def describe(self) -> str:
        """Where the store is, for logs (no secrets)."""

    async def durability(self) -> str:
        """What an acknowledged add survives with this store's settings (one line, for the start-up log)."""

    async def state(self) -> StoreState:
        """The current state (cheap; polled). Creates the store if it does not exist yet."""

    async def snapshot(self) -> StoreSnapshot:
        """Everything, read atomically."""

    async def changes_since(self, base: StoreState) -> StoreDelta | None:
        """The changes after `base`, or None when they cannot be applied to `base` (another epoch, another
        history, or the change log no longer reaches back that far): the reader then takes a `snapshot`."""

    async def add_many(self, items: Sequence[NewClass]) -> list[AddResult]:
        """Add classes, each atomically: a name that exists already (case-insensitively) is left as it is and
        its stored record returned with `created=False`. Returns when the adds are as durable as the store is
        (fsynced for the file store; Redis after its own persistence policy)."""

    async def remove(self, key: str) -> StoreState:
        """Delete an added class by key. Raises `ClassNotFoundError`."""

    async def derived(self, bundle_id: str, fingerprints: Sequence[str]) -> dict[str, Derived | RecordError]:
        """The cached derived data of `bundle_id` for these fingerprints (missing ones are left out; unreadable
        ones come back as the `RecordError` saying why)."""

    async def put_derived(self, bundle_id: str, items: Sequence[Derived]) -> None:
        """Cache derived data of `bundle_id` (overwrites)."""

    async def watch(self, on_change: Callable[[bool], None]) -> None:
        """Call `on_change(reconnected)` whenever another writer may have changed the store; `reconnected` is
        True after the store was away (returns when cancelled)."""

    async def close(self) -> None:
        """Release resources."""


def new_epoch() -> str:
    """A random store epoch."""
    import secrets

    return secrets.token_hex(8)
