"""Reading what the previous version stored, so that existing users keep their classes.

The previous version kept added classes per bundle id: in Redis under `{prefix}:classes:{bundle_id}` (a hash of
name key -> record, with `{prefix}:classes:{bundle_id}:version` beside it), in the class-store file as
`{"format_version": 1, "bundles": {bundle_id: {"version": n, "classes": {key: record}}}}`. Each record held
the name, the descriptions, the chosen anchor sentences with their features for that bundle, and `created`.

Migration (run once, when a store in the new layout does not exist yet) merges every bundle's section into
one set of records for the deployment: a name found in several sections keeps its most recently added record
(the others are logged as skipped). Each section's anchors and features become derived data of its bundle
(when they still fit the record), so a replica on any of those bundles scores exactly as before, and a replica
on another bundle derives them anew. The old data is left where it was (Redis) or kept next to the file
(`FILE.v1`): a downgrade finds it unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlltr.service.store import ClassRecord, Derived, RecordError, decode_array

log = logging.getLogger(__name__)

LEGACY_FILE_FORMAT_VERSION = 1


@dataclass
class LegacyData:
    """Records and derived data read from the previous layout.

    Attributes:
        records: the merged records, oldest first (seq unset: the new store numbers them).
        derived: per bundle id, the derived data its section held.
        problems: what could not be migrated, one line each (logged).
    """

    records: list[ClassRecord] = field(default_factory=list)
    derived: dict[str, list[Derived]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.records)


def legacy_derived(record: ClassRecord, data: Mapping[str, Any]) -> Derived | None:
    """The derived data an old record held for its bundle, or None when it does not fit the record."""
    try:
        features = decode_array(data["anchor_features"])
        embedding = decode_array(data["embedding"])
        sentences = [str(s) for s in data["anchors"]]
    except (KeyError, TypeError, ValueError):
        return None
    if features.ndim != 2 or features.shape[0] != len(sentences) or embedding.shape != (features.shape[1],):
        return None
    try:
        anchors = tuple(record.descriptions.index(s) for s in sentences)
    except ValueError:  # an anchor sentence that is not one of the descriptions
        return None
    if not (np.all(np.isfinite(features)) and np.all(np.isfinite(embedding))) or not anchors:
        return None
    return Derived(record.fingerprint, anchors, features, embedding)


def merge_sections(sections: Mapping[str, Mapping[str, Any]]) -> LegacyData:
    """Merge per-bundle sections `{bundle_id: {key: record JSON}}` into one deployment's records."""
    out = LegacyData()
    candidates: list[tuple[str, int, str, ClassRecord, Mapping[str, Any]]] = []
    for bundle_id, classes in sections.items():
        for key, raw in classes.items():
            try:
                record = ClassRecord.from_json(raw, seq=0)
            except RecordError as exc:
                out.problems.append(f"bundle {bundle_id}, class {key!r}: {exc}; not migrated")
                continue
            seq = raw.get("seq", 0) if isinstance(raw, dict) else 0
            candidates.append((record.added_at, int(seq) if isinstance(seq, int) else 0, bundle_id, record, raw))
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    winners: dict[str, ClassRecord] = {}
    for _, _, _, record, _ in candidates:  # oldest first, so the newest record of a name wins
        previous = winners.get(record.key)
        if previous is not None and not previous.same_class(record.name, record.descriptions):
            out.problems.append(
                f"class {previous.name!r} was added twice under different bundles; keeping the later one "
                f"({record.added_at or 'no date'})"
            )
        winners[record.key] = record
    order = {id(r): i for i, r in enumerate(c[3] for c in candidates)}
    out.records = sorted(winners.values(), key=lambda r: order[id(r)])
    for _, _, bundle_id, record, raw in candidates:
        winner = winners[record.key]
        if winner.fingerprint != record.fingerprint:
            continue
        derived = legacy_derived(winner, raw)
        if derived is not None:
            out.derived.setdefault(bundle_id, []).append(derived)
    return out


def sections_from_file_data(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-bundle sections of a version-1 class-store file's content."""
    bundles = data.get("bundles")
    if not isinstance(bundles, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for bundle_id, section in bundles.items():
        classes = section.get("classes") if isinstance(section, dict) else None
        if isinstance(classes, dict):
            out[str(bundle_id)] = classes
    return out


def is_legacy_file(text: str) -> dict[str, Any] | None:
    """The parsed content when `text` is a whole version-1 class-store file, else None."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict) and data.get("format_version") == LEGACY_FILE_FORMAT_VERSION:
        return data
    return None
