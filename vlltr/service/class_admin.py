"""Backup, restore and migration of added classes: `vlltr classes export FILE` and `vlltr classes import FILE`.

Two kinds of target, behind one small interface (`ClassesTarget`) that a client library can reuse:

- `HttpClasses`: a running service, over HTTP with httpx (`GET /v1/classes/export`, `POST /v1/classes/import`,
  with the admin token as a Bearer token). Classes imported this way are derived by the service right away.
- `StoreClasses`: a class store directly, Redis (URL and key prefix, the deployment's namespace) or a
  class-store file, without a service. Replicas derive what was imported when they see it.

The file is the JSON-lines export format of `vlltr.service.classfile`; it holds descriptions, not features, so
an export taken from a deployment on one bundle imports into a deployment on another.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vlltr.errors import ClassValidationError, ServiceRequestError, StoreUnavailableError
from vlltr.service import classfile
from vlltr.service.registry import new_class_from_json
from vlltr.service.settings import Settings
from vlltr.service.store import ClassRecord, ClassStore, NewClass

IMPORT_CHUNK = 500  # classes per import request (the service's default limit is 1,000)


@dataclass
class ImportSummary:
    """What an import did: counts, and one line per class that was not imported."""

    created: int = 0
    existing: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.problems)

    def line(self) -> str:
        """One line for the terminal."""
        return f"{self.created} classes added, {self.existing} already there, {self.failed} not imported"


class ClassesTarget(Protocol):
    """Where classes are exported from or imported into."""

    def export_lines(self) -> list[str]:
        """The export, line by line (without newlines)."""

    def import_lines(self, lines: Sequence[str]) -> ImportSummary:
        """Import the lines of an export."""

    def close(self) -> None:
        """Release connections."""


def _limits() -> tuple[int, int]:
    fields = Settings.model_fields
    return int(fields["max_descriptions"].default), int(fields["max_description_chars"].default)


class HttpClasses:
    """A running service (`url`), with its admin token when it has one."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 120.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceRequestError(f"cannot reach the service at {self.url}: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise ServiceRequestError(f"{method} {self.url}{path} answered {response.status_code}: {message}")
        return response

    def export_lines(self) -> list[str]:
        return [line for line in self._request("GET", "/v1/classes/export").text.split("\n") if line]

    def import_lines(self, lines: Sequence[str]) -> ImportSummary:
        summary = ImportSummary()
        parsed = list(classfile.read_lines(lines))
        for line in parsed:
            if line.error is not None:
                summary.problems.append(line.error)
        data = [(line.line, lines[line.line - 1]) for line in parsed if line.data is not None]
        for start in range(0, len(data), IMPORT_CHUNK):
            chunk = data[start : start + IMPORT_CHUNK]
            body = "".join(text + "\n" for _, text in chunk).encode("utf-8")
            answer = self._request(
                "POST", "/v1/classes/import", content=body, headers={"Content-Type": classfile.MEDIA_TYPE}
            ).json()
            for result in answer["results"]:
                original = chunk[int(result["index"]) - 1][0]
                status = int(result["status"])
                if status == 201:
                    summary.created += 1
                elif status == 200:
                    summary.existing += 1
                else:
                    message = (result.get("error") or {}).get("message", f"status {status}")
                    summary.problems.append(f"line {original}: {message}".replace(f"line {result['index']}: ", ""))
        return summary

    def close(self) -> None:
        self._client.close()


class StoreClasses:
    """A class store used directly (no service)."""

    def __init__(self, store: ClassStore, closers: Sequence[Any] = ()) -> None:
        self.store = store
        self._closers = list(closers)

    def export_lines(self) -> list[str]:
        snapshot = asyncio.run(self.store.snapshot())
        source = f"{self.store.describe()}, epoch {snapshot.state.epoch}, version {snapshot.state.version}"
        return list(classfile.export_lines(source, snapshot.records, snapshot.quarantined))

    def import_lines(self, lines: Sequence[str]) -> ImportSummary:
        summary = ImportSummary()
        max_count, max_chars = _limits()
        items: list[tuple[int, ClassRecord]] = []
        for line in classfile.read_lines(lines):
            if line.skipped:
                continue
            if line.data is None:
                summary.problems.append(line.error or f"line {line.line} cannot be read")
                continue
            try:
                item = new_class_from_json(line.data, max_count=max_count, max_chars=max_chars, provenance=True)
            except ClassValidationError as exc:
                summary.problems.append(f"line {line.line}: {exc}")
                continue
            record = ClassRecord(item.name, item.descriptions, item.added_at or "", item.added_by, item.metadata)
            items.append((line.line, record))
        results = asyncio.run(self.store.add_many([NewClass(r) for _, r in items])) if items else []
        for (n, record), result in zip(items, results):
            if result.created:
                summary.created += 1
            elif result.record.same_class(record.name, record.descriptions):
                summary.existing += 1
            else:
                summary.problems.append(f"line {n}: class {record.name!r} already exists with other descriptions")
        return summary

    def close(self) -> None:
        async def close_all() -> None:
            for closer in self._closers:
                await closer.close()

        asyncio.run(close_all())


def open_target(
    *,
    url: str | None = None,
    token: str | None = None,
    redis_url: str | None = None,
    redis_prefix: str = "vlltr",
    class_store: Path | None = None,
    must_exist: bool = False,
) -> ClassesTarget:
    """The target named by exactly one of `url`, `redis_url`, `class_store`.

    `must_exist` (an export) refuses a class-store file that does not exist instead of creating an empty store.
    """
    if sum(x is not None for x in (url, redis_url, class_store)) != 1:
        raise ClassValidationError("name one target: --url (a running service), --redis-url or --class-store")
    if url is not None:
        return HttpClasses(url, token)
    if class_store is not None:
        from vlltr.service.store_file import FileClassStore

        if must_exist and not class_store.exists():
            raise StoreUnavailableError(f"there is no class store at {class_store}")
        return StoreClasses(FileClassStore(class_store))
    from vlltr.service.redis_link import RedisLink
    from vlltr.service.store_redis import RedisClassStore

    assert redis_url is not None
    link = RedisLink(redis_url, timeout_s=10.0, retry_s=1.0)
    return StoreClasses(RedisClassStore(link, prefix=redis_prefix), closers=[link])


def write_export(lines: Sequence[str], path: str) -> None:
    """Write export lines to `path` ('-' for standard output)."""
    text = "".join(line + "\n" for line in lines)
    if path == "-":
        import sys

        sys.stdout.write(text)
        return
    Path(path).write_text(text, encoding="utf-8")


def read_import(path: str) -> list[str]:
    """The lines of an export file ('-' for standard input)."""
    if path == "-":
        import sys

        return sys.stdin.read().split("\n")
    return Path(path).read_text(encoding="utf-8").split("\n")


def count_classes(lines: Sequence[str]) -> int:
    """Classes in export lines."""
    return sum(1 for line in classfile.read_lines(lines) if line.data is not None)


def summary_json(summary: ImportSummary) -> str:
    """The summary as JSON (for scripts)."""
    return json.dumps({"created": summary.created, "existing": summary.existing, "problems": summary.problems})
