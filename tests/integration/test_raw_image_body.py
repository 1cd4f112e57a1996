"""`POST /v1/classify` with the image as the raw body (`Content-Type: image/jpeg`, `image/png`, ...), against a real
`vlltr serve`: the same predictions as the multipart upload of the same bytes, the same limits (413 over
`max_image_bytes`, 503 with Retry-After while the body budget is taken, 408 for a stalled body), 415 naming what
is accepted for any other content type, and the image's format read from its bytes, as for multipart.

The server runs without the embedding cache, so every request decodes its image.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from support.slow_clients import read_until_closed, stalled_raw, stalled_upload, status_of
from vlltr.service.api.classify import RAW_IMAGE_TYPES

MAX_IMAGE_BYTES = 64 * 1024
BODY_BUDGET = 70_000  # one stalled upload of MAX_IMAGE_BYTES leaves too little for another image
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(service_bundle, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("raw-body")
    env = {
        "VLLTR_CACHE_SIZE": "0",
        "VLLTR_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "VLLTR_MAX_BUFFERED_BYTES": str(BODY_BUDGET),
        "VLLTR_BODY_READ_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "VLLTR_CLASS_STORE": str(workdir / "classes.json"),
    }
    srv = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def single_server(service_bundle, server_factory, tmp_path_factory):
    """The same server as one process whatever `VLLTR_TEST_WORKERS` says: the body budget is each process's own
    (its bodies are in its memory), so a budget taken by one upload is seen only by the front-end reading it."""
    workdir = tmp_path_factory.mktemp("raw-body-single")
    env = {
        "VLLTR_CACHE_SIZE": "0",
        "VLLTR_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "VLLTR_MAX_BUFFERED_BYTES": str(BODY_BUDGET),
        "VLLTR_BODY_READ_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "VLLTR_CLASS_STORE": str(workdir / "classes.json"),
    }
    srv = server_factory(env=env, args=["--bundle", str(service_bundle), "--workers", "1"], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _photos(bundle: Path, n: int) -> list[Image.Image]:
    data = bundle.parent / "run" / "data"
    names = [line.split()[0] for line in (data / "test.txt").read_text().splitlines()[:n] if line]
    return [Image.open(data / name).convert("RGB") for name in names]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _raw(client: httpx.Client, data: bytes, content_type: str | None, **kwargs) -> httpx.Response:
    headers = {"content-type": content_type} if content_type is not None else {}
    return client.post("/v1/classify", content=data, headers=headers, params={"top_k": 3}, **kwargs)


def _multipart(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/classify", files={"file": ("image", data)}, params={"top_k": 3})


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


@pytest.mark.parametrize("fmt,content_type", [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_a_raw_body_gets_the_same_predictions_as_multipart(client, service_bundle, fmt, content_type):
    for img in _photos(service_bundle, 6):
        data = _encode(img, fmt)
        raw, form = _raw(client, data, content_type), _multipart(client, data)
        assert raw.status_code == form.status_code == 200, (raw.text, form.text)
        assert raw.json()["predictions"] == form.json()["predictions"]
        assert raw.json()["bundle_id"] == form.json()["bundle_id"]


def test_every_decoded_format_is_read_from_its_raw_type(client, service_bundle):
    img = _photos(service_bundle, 1)[0]
    for content_type, fmt in RAW_IMAGE_TYPES.items():
        data = _encode(img, fmt)
        raw, form = _raw(client, data, content_type), _multipart(client, data)
        assert raw.status_code == 200, (content_type, raw.text)
        assert raw.json()["predictions"] == form.json()["predictions"], content_type
    # Parameters and case in the header do not matter.
    r = _raw(client, _encode(img, "JPEG"), "Image/JPEG; charset=binary")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/octet-stream", "image/svg+xml", "image/x-unknown", None]
)
def test_other_content_types_get_415_naming_what_is_accepted(client, service_bundle, content_type):
    message = _error(_raw(client, _encode(_photos(service_bundle, 1)[0], "PNG"), content_type), 415, "unsupported_type")
    assert "multipart/form-data" in message
    assert all(t in message for t in RAW_IMAGE_TYPES), message
    assert (content_type or "none") in message


def test_the_format_comes_from_the_bytes_whatever_the_header_says(client, service_bundle):
    img = _photos(service_bundle, 1)[0]
    jpeg = _encode(img, "JPEG")
    # A JPEG declared as PNG is still a JPEG: the same answer as multipart, which never trusts part types either.
    assert _raw(client, jpeg, "image/png").json()["predictions"] == _multipart(client, jpeg).json()["predictions"]
    # Bytes that are no image, or an image of a format the service does not read, get what multipart gets.
    for data, status, code in [
        (b"not an image at all", 400, "bad_image"),
        (_encode(img, "PPM"), 415, "unsupported_type"),
        (jpeg[: len(jpeg) // 3], 400, "bad_image"),
    ]:
        raw_message = _error(_raw(client, data, "image/jpeg"), status, code)
        assert raw_message == _error(_multipart(client, data), status, code)


def test_an_empty_raw_body_is_a_bad_image_like_an_empty_file(client):
    raw_message = _error(_raw(client, b"", "image/jpeg"), 400, "bad_image")
    assert raw_message == _error(_multipart(client, b""), 400, "bad_image")


def test_a_raw_body_over_max_image_bytes_gets_413(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES)
    assert str(MAX_IMAGE_BYTES) in _error(_raw(client, big, "image/png"), 413, "too_large")

    def chunks():  # no Content-Length: the limit holds while the body streams
        for _ in range(4):
            yield bytes(MAX_IMAGE_BYTES // 2)

    _error(_raw(client, chunks(), "image/png"), 413, "too_large")  # type: ignore[arg-type]
    _error(_multipart(client, big), 413, "too_large")
    # Exactly at the limit is allowed (and then judged as an image).
    _error(_raw(client, bytes(MAX_IMAGE_BYTES), "image/png"), 400, "bad_image")


def test_a_raw_body_waits_its_turn_for_the_body_budget_like_multipart(single_server, service_bundle):
    data = _encode(_photos(service_bundle, 1)[0], "PNG")
    assert len(data) > BODY_BUDGET - MAX_IMAGE_BYTES
    client = httpx.Client(base_url=single_server.url, timeout=30)
    holder = stalled_raw(single_server.port, content_length=MAX_IMAGE_BYTES)  # takes MAX_IMAGE_BYTES of the budget
    try:
        time.sleep(0.3)  # the holder's request is being read
        for r in (_raw(client, data, "image/png"), _multipart(client, data)):
            _error(r, 503, "queue_full")
            assert r.headers["retry-after"] == "1"
        received, closed = read_until_closed([holder], timeout=BODY_TIMEOUT_S + 10)
        assert status_of(received[0]) == 408 and 0 in closed, received
        assert _raw(client, data, "image/png").status_code == 200
        assert _multipart(client, data).status_code == 200
    finally:
        holder.close()
        client.close()


def test_a_stalled_raw_body_is_answered_408_and_closed(server):
    for stall in (stalled_raw, stalled_upload):
        sock = stall(server.port, content_length=30_000)
        started = time.monotonic()
        received, closed = read_until_closed([sock], timeout=BODY_TIMEOUT_S + 10)
        sock.close()
        assert status_of(received[0]) == 408, received
        assert b"connection: close" in received[0].lower()
        assert 0 in closed and BODY_TIMEOUT_S <= closed[0] - started < BODY_TIMEOUT_S + 5, stall
