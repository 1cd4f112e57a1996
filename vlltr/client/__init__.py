"""A Python client of the vlltr HTTP API: `Client` (blocking) and `AsyncClient`, on httpx.

    from vlltr.client import Client

    with Client("http://127.0.0.1:8000") as client:
        answer = client.classify("cat.jpg", top_k=3, explain=True)
        print(answer.best.label, answer.best.score, answer.best.explanation.anchors[0].text)
        results = client.classify_many(["a.jpg", "b.png"])          # chunked into batch requests
        client.add_class("seven with a bar", ["a handwritten seven crossed by a short bar"])

Images are paths, bytes or binary files. Results are the typed dataclasses of `vlltr.client.models`; an error
answer raises `ServiceError` (its HTTP status, the API's error code and message). A 503 (queue full, not
ready, class store unreachable) is retried after its `Retry-After`, up to `retries` times. The admin token
is the `admin_token` argument, else `$VLLTR_ADMIN_TOKEN`. This package imports neither the service nor the
model runtime (only httpx), so it installs and runs anywhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from vlltr.client.models import (
    AddedClass,
    AnchorWeight,
    BatchResult,
    Classification,
    ClassInfo,
    ClassList,
    ErrorInfo,
    Explanation,
    Prediction,
)
from vlltr.errors import ServiceRequestError

__all__ = [
    "AddedClass",
    "AnchorWeight",
    "AsyncClient",
    "BatchResult",
    "ClassInfo",
    "ClassList",
    "Classification",
    "Client",
    "ErrorInfo",
    "Explanation",
    "Prediction",
    "ServiceError",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_ENV = "VLLTR_ADMIN_TOKEN"
DEFAULT_BATCH_SIZE = 32  # images per batch request (the service's `max_batch_files` is 64 by default)
Image = str | os.PathLike[str] | bytes | bytearray | IO[bytes]


# The error the client raises: `status` (0 when the service could not be reached), `error_code`, `detail`.
ServiceError = ServiceRequestError


def _service_error(status: int, code: str, message: str) -> ServiceError:
    return ServiceError(
        f"{status} {code}: {message}" if status else message, status=status, error_code=code, detail=message
    )


def _image(image: Image, index: int) -> tuple[str, bytes]:
    """(filename, bytes) of an image argument."""
    if isinstance(image, bytes | bytearray):
        return f"image-{index}", bytes(image)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    name = getattr(image, "name", None)
    return (Path(str(name)).name if name else f"image-{index}"), image.read()


def _options(top_k: int, explain: bool, classes: Sequence[str] | None, labels: Sequence[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {"top_k": top_k}
    if explain:
        params["explain"] = "true"
    if classes is not None:
        params["classes"] = list(classes)
    if labels is not None:
        params["labels"] = list(labels)
    return params


def _error_of(response: httpx.Response) -> ServiceError:
    try:
        error = response.json()["error"]
        return _service_error(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return _service_error(response.status_code, "http_error", response.text[:200] or response.reason_phrase)


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error_of(response)
    return response.json()


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    files: list[tuple[str, tuple[str, bytes]]] | None = None
    admin: bool = False


class _Base:
    def __init__(self, url: str, admin_token: str | None, retries: int, max_retry_wait_s: float) -> None:
        self.url = url.rstrip("/")
        self.admin_token = admin_token if admin_token is not None else os.environ.get(TOKEN_ENV) or None
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s

    def _headers(self, call: _Call) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if call.admin and self.admin_token else {}

    def _wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying `response`, or None when it is final."""
        if response.status_code != 503 or attempt >= self.retries:
            return None
        try:
            wait = float(response.headers.get("Retry-After", "1"))
        except ValueError:
            wait = 1.0
        return min(max(wait, 0.0), self.max_retry_wait_s)

    @staticmethod
    def _classify_call(image: Image, options: dict[str, Any]) -> _Call:
        return _Call("POST", "/v1/classify", params=options, files=[("file", _image(image, 0))])

    @staticmethod
    def _batch_calls(images: Sequence[Image], options: dict[str, Any], batch_size: int) -> Iterable[_Call]:
        for lo in range(0, len(images), batch_size):
            chunk = images[lo : lo + batch_size]
            files = [("files", _image(img, lo + i)) for i, img in enumerate(chunk)]
            yield _Call("POST", "/v1/classify/batch", params=options, files=files)

    @staticmethod
    def _add_call(name: str, descriptions: Sequence[str], metadata: dict[str, Any] | None) -> _Call:
        body: dict[str, Any] = {"name": name, "descriptions": list(descriptions)}
        if metadata is not None:
            body["metadata"] = metadata
        return _Call("POST", "/v1/classes", json=body, admin=True)


class Client(_Base):
    """Blocking client. Use as a context manager, or call `close()`.

    Args:
        url: the service, e.g. `http://127.0.0.1:8000`.
        admin_token: sent on class changes; default `$VLLTR_ADMIN_TOKEN`.
        timeout: seconds per request.
        retries: how often a 503 is retried (after its `Retry-After`, at most `max_retry_wait_s`).
        transport: an httpx transport (tests, proxies).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        admin_token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, admin_token, retries, max_retry_wait_s)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    files=call.files,
                    headers=self._headers(call),
                )
            except httpx.TransportError as exc:
                raise _service_error(0, "unreachable", f"cannot reach the service at {self.url}: {exc}") from None
            wait = self._wait(response, attempt)
            if wait is None:
                return _json(response)
            time.sleep(wait)
            attempt += 1

    def classify(
        self,
        image: Image,
        *,
        top_k: int = 5,
        explain: bool = False,
        classes: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Classification:
        """Classify one image (`classes`: only these served classes; `labels`: rank free-text labels instead)."""
        return Classification.from_json(
            self._send(self._classify_call(image, _options(top_k, explain, classes, labels)))
        )

    def classify_many(
        self,
        images: Sequence[Image],
        *,
        top_k: int = 5,
        explain: bool = False,
        classes: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> list[BatchResult]:
        """Classify many images in batch requests of `batch_size`; one result (or its own error) per image,
        in order, indexed over all of `images`."""
        out: list[BatchResult] = []
        for call in self._batch_calls(images, _options(top_k, explain, classes, labels), batch_size):
            body = self._send(call)
            base = len(out)
            out.extend(BatchResult.from_json(item, index=base + i) for i, item in enumerate(body["results"]))
        return out

    def classes(self) -> ClassList:
        """The class table."""
        return ClassList.from_json(self._send(_Call("GET", "/v1/classes")))

    def add_class(
        self, name: str, descriptions: Sequence[str], *, metadata: dict[str, Any] | None = None
    ) -> AddedClass:
        """Add a class from its descriptions (a retry of an add that succeeded answers `created=False`)."""
        return AddedClass.from_json(self._send(self._add_call(name, descriptions, metadata)))

    def delete_class(self, name: str) -> None:
        """Delete a class added at run time."""
        self._send(_Call("DELETE", f"/v1/classes/{_quote(name)}", admin=True))

    def model(self) -> dict[str, Any]:
        """`GET /v1/model`: bundle, architecture, classes, provider."""
        info: dict[str, Any] = self._send(_Call("GET", "/v1/model"))
        return info


class AsyncClient(_Base):
    """The same API as `Client`, for asyncio (`async with AsyncClient(url) as client: await client.classify(...)`)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        admin_token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, admin_token, retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    files=call.files,
                    headers=self._headers(call),
                )
            except httpx.TransportError as exc:
                raise _service_error(0, "unreachable", f"cannot reach the service at {self.url}: {exc}") from None
            wait = self._wait(response, attempt)
            if wait is None:
                return _json(response)
            await asyncio.sleep(wait)
            attempt += 1

    async def classify(
        self,
        image: Image,
        *,
        top_k: int = 5,
        explain: bool = False,
        classes: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Classification:
        """Classify one image (see `Client.classify`)."""
        call = self._classify_call(image, _options(top_k, explain, classes, labels))
        return Classification.from_json(await self._send(call))

    async def classify_many(
        self,
        images: Sequence[Image],
        *,
        top_k: int = 5,
        explain: bool = False,
        classes: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = 2,
    ) -> list[BatchResult]:
        """Classify many images in batch requests of `batch_size`, `concurrency` requests at a time; one result
        per image, in order."""
        calls = list(self._batch_calls(images, _options(top_k, explain, classes, labels), batch_size))
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(call: _Call) -> Any:
            async with gate:
                return await self._send(call)

        bodies = await asyncio.gather(*(one(call) for call in calls))
        out: list[BatchResult] = []
        for body in bodies:
            base = len(out)
            out.extend(BatchResult.from_json(item, index=base + i) for i, item in enumerate(body["results"]))
        return out

    async def classes(self) -> ClassList:
        """The class table."""
        return ClassList.from_json(await self._send(_Call("GET", "/v1/classes")))

    async def add_class(
        self, name: str, descriptions: Sequence[str], *, metadata: dict[str, Any] | None = None
    ) -> AddedClass:
        """Add a class from its descriptions."""
        return AddedClass.from_json(await self._send(self._add_call(name, descriptions, metadata)))

    async def delete_class(self, name: str) -> None:
        """Delete a class added at run time."""
        await self._send(_Call("DELETE", f"/v1/classes/{_quote(name)}", admin=True))

    async def model(self) -> dict[str, Any]:
        """`GET /v1/model`."""
        info: dict[str, Any] = await self._send(_Call("GET", "/v1/model"))
        return info


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
