"""Hostile class uploads against real `vlltr serve` processes: each gets its 4xx (never a 5xx), names are taken
literally (Redis glob characters included), and a name raced on two replicas has exactly one winner on which
both replicas agree, with the shared Redis store and with the embedded shared-file store alike.
"""

from __future__ import annotations

import json
import threading
import uuid
from urllib.parse import quote

import httpx
import pytest

TOKEN = "uploads-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def server(service_bundle, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile-uploads")
    env = {"VLLTR_ADMIN_TOKEN": TOKEN, "VLLTR_CLASS_STORE": str(workdir / "classes.json")}
    srv = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def _chunks(total: int, size: int = 256 * 1024):
    # A body without Content-Length (chunked): the limit must hold while streaming, not only on the header.
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"a description line\n" * (n // 19) + b"x" * (n % 19)
        sent += n


def _multipart(name: bytes, file: bytes, boundary: str = "hostileboundary") -> tuple[bytes, dict]:
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'.encode()
        + name
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\n".encode()
        + file
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


TEXT = b"a thing with stripes\na striped thing on a plain background\n"

# (label, request kwargs, expected status, expected code)
HOSTILE: list[tuple[str, dict, int, str]] = [
    ("empty JSON body", dict(content=b"", headers={"content-type": "application/json"}), 422, "invalid"),
    ("JSON null", dict(content=b"null", headers={"content-type": "application/json"}), 422, "invalid"),
    (
        "empty multipart body",
        dict(content=b"", headers={"content-type": "multipart/form-data; boundary=b"}),
        422,
        "invalid",
    ),
    ("empty text file", dict(data={"name": "empty file"}, files={"file": ("d.txt", b"")}), 422, "invalid"),
    ("empty name", dict(data={"name": ""}, files={"file": ("d.txt", TEXT)}), 422, "invalid"),
    (
        "10 MB text file",
        dict(data={"name": "huge"}, files={"file": ("d.txt", b"line of text\n" * (TEN_MB // 13))}),
        413,
        "too_large",
    ),
    ("10 MB JSON", dict(json={"name": "huge", "descriptions": ["x" * 1000] * (TEN_MB // 1000)}), 413, "too_large"),
    (
        "10 MB chunked JSON",
        dict(content=_chunks(TEN_MB), headers={"content-type": "application/json"}),
        413,
        "too_large",
    ),
    (
        "10 MB name field",
        dict(content=_multipart(b"n" * TEN_MB, TEXT)[0], headers=_multipart(b"", b"")[1]),
        413,
        "too_large",
    ),
    (
        "invalid UTF-8 file",
        dict(data={"name": "bad bytes"}, files={"file": ("d.txt", b"ok line\n\xc3\x28 broken\n")}),
        422,
        "invalid",
    ),
    (
        "invalid UTF-8 JSON",
        dict(content=b'{"name": "x\xff", "descriptions": ["y"]}', headers={"content-type": "application/json"}),
        422,
        "invalid",
    ),
    (
        "invalid UTF-8 name field",
        dict(content=_multipart(b"bad \xff\xfe name", TEXT)[0], headers=_multipart(b"", b"")[1]),
        422,
        "invalid",
    ),
    (
        "lone surrogate in JSON",
        dict(content=b'{"name": "x\\ud800", "descriptions": ["y"]}', headers={"content-type": "application/json"}),
        422,
        "invalid",
    ),
    ("NUL in name", dict(json={"name": "a\x00b", "descriptions": ["x"]}), 422, "invalid"),
    ("escape sequence in name", dict(json={"name": "\x1b[31mred", "descriptions": ["x"]}), 422, "invalid"),
    ("bidi override in name", dict(json={"name": "abc\u202etxt.exe", "descriptions": ["x"]}), 422, "invalid"),
    ("line separator in name", dict(json={"name": "a\u2028b", "descriptions": ["x"]}), 422, "invalid"),
    ("newline in name", dict(json={"name": "two\nlines", "descriptions": ["x"]}), 422, "invalid"),
    (
        "NUL in description file",
        dict(data={"name": "nul file"}, files={"file": ("d.txt", b"fine\nbad\x00line\n")}),
        422,
        "invalid",
    ),
    ("bell in description", dict(json={"name": "bell", "descriptions": ["ring \x07 ring"]}), 422, "invalid"),
    ("slash in name", dict(json={"name": "a/b", "descriptions": ["x"]}), 422, "invalid"),
    ("path traversal name", dict(json={"name": "../../etc/passwd", "descriptions": ["x"]}), 422, "invalid"),
    ("backslash traversal name", dict(json={"name": "..\\..\\boot.ini", "descriptions": ["x"]}), 422, "invalid"),
    ("dot-dot name", dict(json={"name": "..", "descriptions": ["x"]}), 422, "invalid"),
    ("10,000-character name", dict(json={"name": "n" * 10_000, "descriptions": ["x"]}), 422, "invalid"),
    (
        "10,000-character name in a form",
        dict(data={"name": "n" * 10_000}, files={"file": ("d.txt", TEXT)}),
        422,
        "invalid",
    ),
    (
        "100,000-line file",
        dict(data={"name": "many lines"}, files={"file": ("d.txt", b"l\n" * 100_000)}),
        422,
        "invalid",
    ),
    ("description of 100,000 characters", dict(json={"name": "long", "descriptions": ["y" * 100_000]}), 422, "invalid"),
    (
        "JSON nested 100,000 deep",
        dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}),
        422,
        "invalid",
    ),
    (
        "JSON integer of 5,000 digits",
        dict(
            content=b'{"name": ' + b"9" * 5000 + b', "descriptions": ["x"]}',
            headers={"content-type": "application/json"},
        ),
        422,
        "invalid",
    ),
    (
        "JSON infinity",
        dict(content=b'{"name": Infinity, "descriptions": ["x"]}', headers={"content-type": "application/json"}),
        422,
        "invalid",
    ),
    ("descriptions as an object", dict(json={"name": "obj", "descriptions": {"a": 1}}), 422, "invalid"),
    (
        "two description files",
        dict(data={"name": "two"}, files=[("file", ("a.txt", TEXT)), ("file", ("b.txt", TEXT))]),
        413,
        "too_large",
    ),
    (
        "XML body",
        dict(content=b"<class name='x'/>", headers={"content-type": "application/xml"}),
        415,
        "unsupported_type",
    ),
    ("trained class name", None, 409, "conflict"),
]


@pytest.mark.parametrize("label,kwargs,status,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_class_upload_is_refused_with_its_4xx(client, reliability_log, label, kwargs, status, code):
    if kwargs is None:  # a trained class's name, upper-cased: names are unique case-insensitively
        trained = client.get("/v1/classes").json()["classes"][0]["name"]
        kwargs = dict(json={"name": trained.upper(), "descriptions": ["x"]})
    r = client.post("/v1/classes", **kwargs)
    reliability_log.add("hostile uploads", requests=1, inputs=1, errors=int(r.status_code >= 500))
    assert r.status_code == status, f"{label}: {r.status_code} {r.text[:300]}"
    assert r.json()["error"]["code"] == code, r.text[:300]


def test_hostile_names_on_delete_are_refused_with_4xx(client, reliability_log):
    paths = ["n" * 10_000, "%00", "a%2Fb", "..%2F..%2Fetc", "%E2%80%AE", "%FF%FE", "*", "%2A", "[a-z]", "%5Cx"]
    for path in paths:
        r = client.delete(f"/v1/classes/{path}")
        reliability_log.add("hostile uploads", requests=1, inputs=1, errors=int(r.status_code >= 500))
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] in ("invalid", "not_found"), r.text[:200]


def test_utf8_bom_and_crlf_files_are_accepted(client, reliability_log):
    name = f"bom {uuid.uuid4().hex[:6]}"
    r = client.post(
        "/v1/classes",
        data={"name": name},
        files={"file": ("d.txt", b"\xef\xbb\xbfa tabby\tcat\r\na cat with stripes\r\n\r\n")},
    )
    reliability_log.add("hostile uploads", requests=2, inputs=1)
    assert r.status_code == 201, r.text
    assert r.json()["anchors"] and all("\ufeff" not in a and "\r" not in a for a in r.json()["anchors"])
    assert client.delete(f"/v1/classes/{quote(name)}").status_code == 200


def test_server_survived_every_hostile_upload(server, client):
    assert server.alive()
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/classes", json={"name": f"after {uuid.uuid4().hex[:6]}", "descriptions": ["still works"]})
    assert r.status_code == 201, r.text


# ---- two replicas ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_replicas(service_bundle, server_factory, persistent_redis_factory, tmp_path_factory):
    redis_server = persistent_redis_factory()
    env = {"VLLTR_REDIS_URL": redis_server.url, "VLLTR_ADMIN_TOKEN": TOKEN, "VLLTR_SYNC_INTERVAL_S": "0.2"}
    pair = [
        server_factory(
            env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp(f"upload-redis-{i}")
        )
        for i in range(2)
    ]
    yield pair, redis_server
    for srv in pair:
        srv.stop()


@pytest.fixture(scope="module")
def file_replicas(service_bundle, server_factory, tmp_path_factory):
    store = tmp_path_factory.mktemp("shared-store") / "classes.json"
    env = {"VLLTR_CLASS_STORE": str(store), "VLLTR_ADMIN_TOKEN": TOKEN, "VLLTR_SYNC_INTERVAL_S": "0.2"}
    pair = [
        server_factory(
            env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp(f"upload-file-{i}")
        )
        for i in range(2)
    ]
    yield pair
    for srv in pair:
        srv.stop()


def _race(urls: list[str], names: list[str], per_url: int = 4) -> list[tuple[str, str, int]]:
    """POST the same class (under each spelling in `names`, described with that spelling) from `per_url` threads
    per replica at once; (url, spelling, status) each."""
    jobs = [(url, names[i % len(names)]) for url in urls for i in range(per_url)]
    barrier = threading.Barrier(len(jobs))
    out: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    def post(url: str, name: str) -> None:
        with httpx.Client(base_url=url, timeout=60, headers=AUTH) as c:
            barrier.wait()
            r = c.post("/v1/classes", json={"name": name, "descriptions": [f"only one {name} may exist"]})
            with lock:
                out.append((url, name, r.status_code))

    threads = [threading.Thread(target=post, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def _tables(urls: list[str]) -> list[dict]:
    return [httpx.get(f"{u}/v1/classes", timeout=30).json() for u in urls]


def _wait_agree(urls: list[str], version: int) -> list[dict]:
    import time

    deadline = time.monotonic() + 10
    while True:
        tables = _tables(urls)
        if all(t["class_table_version"] >= version for t in tables) or time.monotonic() > deadline:
            return tables
        time.sleep(0.05)


@pytest.mark.parametrize("store", ["redis", "file"])
def test_duplicate_name_racing_on_two_replicas_has_one_winner_both_agree(store, request, reliability_log):
    pair = (
        request.getfixturevalue("redis_replicas")[0] if store == "redis" else request.getfixturevalue("file_replicas")
    )
    urls = [s.url for s in pair]
    for round_ in range(3):
        base = f"Racer {store} {round_} {uuid.uuid4().hex[:6]}"
        spellings = [base, base.upper(), base.lower()]  # one class, case-insensitively
        results = _race(urls, spellings)
        statuses = sorted(status for _, _, status in results)
        reliability_log.add("hostile uploads", requests=len(results), inputs=1, errors=sum(s >= 500 for s in statuses))
        # One winner; the adds identical to it (same spelling, same descriptions) succeed as well (200), the
        # others (other descriptions) conflict.
        (winner,) = [name for _, name, status in results if status == 201]
        same = sum(name == winner for _, name, _ in results)
        assert statuses == [200] * (same - 1) + [201] + [409] * (len(results) - same), results
        version = max(t["class_table_version"] for t in _tables(urls))
        tables = _wait_agree(urls, version)
        rows = [
            [(c["class_id"], c["name"]) for c in t["classes"] if c["name"].casefold() == base.casefold()]
            for t in tables
        ]
        assert len(rows[0]) == 1 and rows[0] == rows[1], rows
        assert tables[0]["class_table_version"] == tables[1]["class_table_version"]
        assert [c["name"] for c in tables[0]["classes"]] == [c["name"] for c in tables[1]["classes"]]


GLOB_NAMES = ["*", "a*", "a?", "[ab]c", "[^x]", "h*llo world", "{a,b}", "prefix:*", "%s", "$(rm -rf)"]


def test_redis_glob_characters_in_names_are_taken_literally(redis_replicas, reliability_log):
    import redis

    (a, b), redis_server = redis_replicas
    stem = uuid.uuid4().hex[:6]
    names = [f"{n} {stem}" if i % 2 else n for i, n in enumerate(GLOB_NAMES)]
    plain = [f"ac {stem}", f"hello world {stem}", "ab"]  # names some of the patterns would match
    with httpx.Client(base_url=a.url, timeout=60, headers=AUTH) as ca:
        for name in names + plain:
            r = ca.post("/v1/classes", json={"name": name, "descriptions": [f"the class called {name}"]})
            assert r.status_code == 201, (name, r.text)
        # Deleting each pattern removes exactly that class, never what the pattern would match.
        for name in names:
            r = ca.delete(f"/v1/classes/{quote(name, safe='')}")
            assert r.status_code == 200, (name, r.text)
            assert r.json()["name"] == name
        version = r.json()["class_table_version"]
    reliability_log.add("hostile uploads", requests=2 * len(names) + len(plain), inputs=len(names))
    for table in _wait_agree([a.url, b.url], version):
        present = {c["name"] for c in table["classes"]}
        assert set(plain) <= present, sorted(present)
        assert not set(names) & present
    # Names are hash fields and log entries, never key names: whatever the names, the store is its fixed keys
    # (meta, records, the change log and one derived-data hash per bundle).
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = sorted(k.decode() for k in client.scan_iter(match="*"))
        class_keys = [k for k in keys if k.startswith("vlltr:added-classes:")]
        hash_key = "vlltr:added-classes:records"
        stored = [json.loads(v)["name"] for v in client.hgetall(hash_key).values()]
    finally:
        client.close()
    derived = [k for k in class_keys if k.startswith("vlltr:added-classes:derived:")]
    assert len(derived) == 1, keys
    assert class_keys == sorted([*derived, "vlltr:added-classes:log", "vlltr:added-classes:meta", hash_key]), keys
    assert not [k for k in keys if stem in k], keys
    assert set(plain) <= set(stored) and not set(names) & set(stored)
