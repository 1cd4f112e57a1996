"""The class export format: JSON lines, one added class per line, independent of any bundle.

    {"format": "vlltr-classes", "format_version": 1, "exported_at": T, "source": S, "classes": N}
    {"name": "okapi", "descriptions": ["...", "..."], "added_at": T, "added_by": "token:ab12...", "metadata": {}}
    {"quarantined": {"key": K, "reason": R, "raw": "..."}}

The first line (the header) is optional when importing; so are `added_at`, `added_by` and `metadata`. Lines
of stored entries that could not be read are exported as `quarantined` (so a backup keeps them) and skipped on
import. Descriptions are the source of truth: importing into a deployment on another bundle derives the anchors
and features there. `vlltr classes export|import` and `GET /v1/classes/export`, `POST /v1/classes/import` write
and read exactly this.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vlltr.service.store import ClassRecord, Quarantined

EXPORT_FORMAT = "vlltr-classes"
EXPORT_FORMAT_VERSION = 1
MEDIA_TYPE = "application/x-ndjson"


def header_line(source: str, count: int) -> str:
    """The export's first line."""
    return json.dumps(
        {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source,
            "classes": count,
        },
        ensure_ascii=False,
    )


def class_line(record: ClassRecord) -> str:
    """One class as an export line."""
    return json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":"))


def quarantined_line(entry: Quarantined) -> str:
    """One unreadable stored entry, kept verbatim."""
    return json.dumps({"quarantined": {"key": entry.key, "reason": entry.reason, "raw": entry.raw}}, ensure_ascii=False)


def export_lines(source: str, records: Sequence[ClassRecord], quarantined: Sequence[Quarantined] = ()) -> Iterator[str]:
    """Every line of an export (without newlines): the header, the records in `seq` order, the quarantined."""
    yield header_line(source, len(records))
    for record in sorted(records, key=lambda r: r.seq):
        yield class_line(record)
    for entry in quarantined:
        yield quarantined_line(entry)


@dataclass(frozen=True)
class ImportLine:
    """One line of an import: a class (its raw JSON object, validated by whoever adds it), or why not.

    Attributes:
        line: the 1-based line number.
        data: the class's JSON object (None for a line that is not a class).
        error: why the line cannot be imported (None for a class or a skipped line).
        skipped: a header or a quarantined entry (nothing to import).
    """

    line: int
    data: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False


def read_lines(lines: Iterable[str | bytes]) -> Iterator[ImportLine]:
    """Parse an export line by line; blank lines are ignored, a bad line is reported and the rest go on."""
    for n, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            yield ImportLine(n, error=f"line {n} is not valid JSON ({exc})")
            continue
        if not isinstance(data, dict):
            yield ImportLine(n, error=f"line {n} is not a JSON object")
        elif data.get("format") == EXPORT_FORMAT:
            if data.get("format_version") != EXPORT_FORMAT_VERSION:
                yield ImportLine(n, error=f"line {n}: unknown export format_version {data.get('format_version')!r}")
            else:
                yield ImportLine(n, skipped=True)
        elif "quarantined" in data:
            yield ImportLine(n, skipped=True)
        else:
            yield ImportLine(n, data=data)
