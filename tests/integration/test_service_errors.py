"""Every bad input gets its 4xx with the JSON error envelope, nothing gets a 500, the process stays up,
and a flood past the queue bound gets 503 + Retry-After instead of timeouts.
"""

from __future__ import annotations

import io
import json
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

MAX_IMAGE_BYTES = 256 * 1024


def _png(size=(40, 30), colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(service_bundle, server_factory, tmp_path_factory):
    env = {
        "VLLTR_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "VLLTR_MAX_PIXELS": "1000000",
        "VLLTR_MAX_BATCH_FILES": "4",
        "VLLTR_MAX_DESCRIPTIONS": "8",
        "VLLTR_MAX_DESCRIPTION_CHARS": "200",
        "VLLTR_MAX_CLASS_UPLOAD_BYTES": "16384",
        "VLLTR_MAX_TOP_K": "20",
    }
    srv = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp("errors"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _expect(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body


BAD_IMAGES = [
    ("garbage bytes", b"this is not an image", 400, "bad_image"),
    ("empty file", b"", 400, "bad_image"),
    ("truncated PNG", _png()[:40], 400, "bad_image"),
    ("PNG header only", b"\x89PNG\r\n\x1a\n", 400, "bad_image"),
    ("too many bytes", b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES), 413, "too_large"),
    ("too many pixels", _png(size=(1500, 1000)), 413, "too_large"),
    ("unsupported PPM", _encode(Image.new("RGB", (8, 8)), "PPM"), 415, "unsupported_type"),
    ("unsupported ICO", _encode(Image.new("RGB", (16, 16)), "ICO"), 415, "unsupported_type"),
]


@pytest.mark.parametrize("label,data,status,code", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_get_their_status(client, label, data, status, code):
    _expect(client.post("/v1/classify", files={"file": ("x", data)}), status, code)


def test_bad_images_fail_alone_inside_a_batch(client):
    files = [("files", ("ok.png", _png()))] + [("files", (label, data)) for label, data, _, _ in BAD_IMAGES[:3]]
    r = client.post("/v1/classify/batch", files=files)
    assert r.status_code == 200
    statuses = [item["status"] for item in r.json()["results"]]
    assert statuses == [200, 400, 400, 400]
    files = [("files", ("ok.png", _png())), ("files", ("big", BAD_IMAGES[4][1])), ("files", ("ppm", BAD_IMAGES[6][1]))]
    results = client.post("/v1/classify/batch", files=files).json()["results"]
    assert [(i["status"], (i["error"] or {}).get("code")) for i in results] == [
        (200, None),
        (413, "too_large"),
        (415, "unsupported_type"),
    ]


REQUEST_ERRORS = [
    (
        "not multipart",
        dict(content=b"raw", headers={"content-type": "application/octet-stream"}),
        415,
        "unsupported_type",
    ),
    ("no content type", dict(content=b"raw"), 415, "unsupported_type"),
    ("wrong field name", dict(files={"image": ("a.png", _png())}), 422, "invalid"),
    ("field is not a file", dict(files={"file": (None, "hello")}), 422, "invalid"),
    ("no boundary", dict(content=b"x", headers={"content-type": "multipart/form-data"}), 422, "invalid"),
    (
        "malformed multipart",
        dict(content=b"--b\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=b"}),
        422,
        "invalid",
    ),
    ("top_k zero", dict(files={"file": ("a.png", _png())}, params={"top_k": 0}), 422, "invalid"),
    ("top_k text", dict(files={"file": ("a.png", _png())}, params={"top_k": "many"}), 422, "invalid"),
    ("top_k over the limit", dict(files={"file": ("a.png", _png())}, params={"top_k": 21}), 422, "invalid"),
    ("two files", dict(files=[("file", ("a.png", _png())), ("file", ("b.png", _png()))]), 413, "too_large"),
]


@pytest.mark.parametrize("label,kwargs,status,code", REQUEST_ERRORS, ids=[e[0] for e in REQUEST_ERRORS])
def test_bad_classify_requests(client, label, kwargs, status, code):
    _expect(client.post("/v1/classify", **kwargs), status, code)


def test_bad_batch_requests(client):
    _expect(client.post("/v1/classify/batch", files=[("files", ("a.png", _png()))] * 5), 413, "too_large")
    _expect(client.post("/v1/classify/batch", data={"other": "x"}, files={"nope": ("a", b"1")}), 422, "invalid")
    _expect(
        client.post("/v1/classify/batch", content=b"", headers={"content-type": "multipart/form-data; boundary=zz"}),
        422,
        "invalid",
    )


CLASS_ERRORS = [
    ("bad JSON", dict(content=b"{nope", headers={"content-type": "application/json"}), 422),
    ("JSON list", dict(json=["a"]), 422),
    ("missing name", dict(json={"descriptions": ["x"]}), 422),
    ("missing descriptions", dict(json={"name": "n"}), 422),
    ("unknown field", dict(json={"name": "n", "descriptions": ["x"], "colour": "red"}), 422),
    ("name not a string", dict(json={"name": 5, "descriptions": ["x"]}), 422),
    ("empty name", dict(json={"name": "   ", "descriptions": ["x"]}), 422),
    ("long name", dict(json={"name": "n" * 101, "descriptions": ["x"]}), 422),
    ("slash in name", dict(json={"name": "a/b", "descriptions": ["x"]}), 422),
    ("backslash in name", dict(json={"name": "a\\b", "descriptions": ["x"]}), 422),
    ("control char in name", dict(json={"name": "a\x00b", "descriptions": ["x"]}), 422),
    ("zero-width char in name", dict(json={"name": "a\u200bb", "descriptions": ["x"]}), 422),
    ("no descriptions", dict(json={"name": "n", "descriptions": []}), 422),
    ("blank description", dict(json={"name": "n", "descriptions": ["ok", "   "]}), 422),
    ("description not a string", dict(json={"name": "n", "descriptions": [3]}), 422),
    ("too many descriptions", dict(json={"name": "n", "descriptions": [f"d{i}" for i in range(9)]}), 422),
    ("description too long", dict(json={"name": "n", "descriptions": ["x" * 201]}), 422),
    ("control char in description", dict(json={"name": "n", "descriptions": ["a\x07b"]}), 422),
    ("file not UTF-8", dict(data={"name": "n"}, files={"file": ("d.txt", b"\xff\xfe\xfa bad")}), 422),
    ("file without lines", dict(data={"name": "n"}, files={"file": ("d.txt", b"\n  \n")}), 422),
    ("form without file", dict(data={"name": "n"}, files={"other": ("d.txt", b"x")}), 422),
    ("form without name", dict(files={"file": ("d.txt", b"x")}), 422),
    (
        "too many lines",
        dict(data={"name": "n"}, files={"file": ("d.txt", b"\n".join(b"l%d" % i for i in range(9)))}),
        422,
    ),
    ("body too large", dict(json={"name": "n", "descriptions": ["x" * 150] * 120}), 413),
    ("plain text body", dict(content=b"name", headers={"content-type": "text/plain"}), 415),
]


@pytest.mark.parametrize("label,kwargs,status", CLASS_ERRORS, ids=[e[0] for e in CLASS_ERRORS])
def test_bad_class_requests(client, label, kwargs, status):
    code = {422: "invalid", 413: "too_large", 415: "unsupported_type"}[status]
    _expect(client.post("/v1/classes", **kwargs), status, code)


def test_unknown_routes_and_methods(client):
    _expect(client.get("/v2/nothing"), 404, "not_found")
    _expect(client.put("/v1/classify"), 405, "method_not_allowed")
    _expect(client.delete("/v1/classes/never%20added"), 404, "not_found")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/model?x=\x01 HTTP/1.1\r\nHost: x\r\n\r\n",  # a control character in the target
        b"GET /v1/model HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",  # a space in a header name
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["control-character", "header-name", "garbage"],
)
def test_a_request_that_is_not_http_gets_the_json_envelope(server, raw):
    # The HTTP parser refuses these before any route runs; the answer is still the service's error shape.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "bad_request"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]),
    cuts=st.integers(0, 20),
)
def test_mutated_images_never_cause_a_server_error(client, seed, fmt, cuts):
    rng = random.Random(seed)
    img = Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (rng.randint(1, 64), rng.randint(1, 64), 3), dtype=np.uint8)
    )
    data = bytearray(_encode(img, fmt))
    for _ in range(cuts):  # flip bytes, sometimes truncate
        data[rng.randrange(len(data))] = rng.randrange(256)
    if cuts % 3 == 1:
        data = data[: rng.randrange(1, len(data) + 1)]
    r = client.post("/v1/classify", files={"file": ("f", bytes(data))})
    assert r.status_code in (200, 400, 413, 415), (r.status_code, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"code", "message"}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=120), descriptions=st.lists(st.text(max_size=250), max_size=10))
def test_random_class_requests_never_cause_a_server_error(client, name, descriptions):
    r = client.post("/v1/classes", json={"name": name, "descriptions": descriptions})
    assert r.status_code in (201, 409, 413, 422), (r.status_code, r.text)
    r = client.delete("/v1/classes/" + quote(name, safe=""))
    assert r.status_code in (200, 404, 409, 422), (r.status_code, r.text)


def test_process_stayed_healthy_and_never_answered_500(client, server):
    assert server.alive()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    seen = set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "vlltr_request_duration_seconds":
            seen |= {(s.labels["route"], s.labels["status"]) for s in family.samples}
    assert {status for _, status in seen} >= {"200", "400", "413", "415", "422"}
    # The only 5xx ever answered: /readyz saying 503 while the server was warming up.
    assert {(route, status) for route, status in seen if status.startswith("5")} <= {("/readyz", "503")}, seen
    assert client.post("/v1/classify", files={"file": ("ok.png", _png())}).status_code == 200


# ---- overload ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_queue_server(service_bundle, server_factory, tmp_path_factory):
    args = [
        "--bundle",
        str(service_bundle),
        "--queue-size",
        "2",
        "--max-batch-size",
        "1",
        "--max-wait-ms",
        "0",
        "--cache-size",
        "0",
        "--retry-after-s",
        "2",
    ]
    srv = server_factory(args=args, workdir=tmp_path_factory.mktemp("overload"))
    yield srv
    srv.stop()


def test_flood_past_the_queue_bound_gets_503_with_retry_after(tiny_queue_server):
    images = [_png(size=(64 + i, 48), colour=(i * 7 % 255, 90, 200)) for i in range(40)]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        with httpx.Client(base_url=tiny_queue_server.url, timeout=60) as c:
            n = 3 if i % 8 == 0 else 2  # a 3-image batch never fits a queue of 2
            files = [("files", (f"{i}-{j}.png", images[(i + j) % len(images)])) for j in range(n)]
            r = c.post("/v1/classify/batch", files=files)
            if r.status_code == 503:
                assert r.headers["retry-after"] == "2"
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.status_code == 200, r.text
                assert all(item["status"] == 200 for item in r.json()["results"])
            with lock:
                statuses.append(r.status_code)

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(send, range(96)))
    assert len(statuses) == 96
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) >= 12 and statuses.count(200) > 0
    with httpx.Client(base_url=tiny_queue_server.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        rejected = next(
            s.value
            for f in text_string_to_metric_families(c.get("/metrics").text)
            if f.name == "vlltr_requests_rejected"
            for s in f.samples
            if s.labels.get("reason") == "queue_full" and s.name.endswith("_total")
        )
        assert rejected == statuses.count(503)
        assert c.post("/v1/classify", files={"file": ("ok.png", images[0])}).status_code == 200
    assert tiny_queue_server.alive()
