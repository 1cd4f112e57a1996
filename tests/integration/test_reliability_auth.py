"""Admin authentication against a real server: class changes without the token get 401, with a wrong one 403,
before the body is even read; and neither the token nor the Redis password ever appears in a log line, a
response, the metrics or the command's help and errors. tests/unit/service/test_reliability_auth.py checks that
the comparison is constant-time.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from urllib.parse import quote

import httpx
import pytest

# Random per run, so a leak cannot hide behind a fixed string some log line happens to contain.
TOKEN = "tok-" + uuid.uuid4().hex + "-" + uuid.uuid4().hex
REDIS_PASSWORD = "pw-" + uuid.uuid4().hex
SECRETS = (TOKEN, REDIS_PASSWORD)


@pytest.fixture(scope="module")
def redis_server(persistent_redis_factory):
    return persistent_redis_factory(password=REDIS_PASSWORD)


@pytest.fixture(scope="module")
def server(service_bundle, server_factory, redis_server, tmp_path_factory):
    env = {
        "VLLTR_ADMIN_TOKEN": TOKEN,
        "VLLTR_REDIS_URL": redis_server.url,
        "VLLTR_LOG_LEVEL": "debug",
        "VLLTR_ACCESS_LOG": "true",
        "VLLTR_REDIS_RETRY_S": "0.2",
    }
    srv = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp("auth"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def responses() -> list[httpx.Response]:
    """Every response of this module, checked for secrets at the end."""
    return []


def _body(name: str) -> dict:
    return {"name": name, "descriptions": ["a class only an admin may add"]}


REFUSED = [
    ("no header", {}, 401, "unauthorized"),
    ("bearer without a token", {"Authorization": "Bearer"}, 401, "unauthorized"),
    (
        "basic scheme with the token",
        {"Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()},
        401,
        "unauthorized",
    ),
    ("token without a scheme", {"Authorization": TOKEN}, 401, "unauthorized"),
    ("wrong token", {"Authorization": "Bearer not-the-token"}, 403, "forbidden"),
    ("token prefix", {"Authorization": f"Bearer {TOKEN[:-1]}"}, 403, "forbidden"),
    ("token plus a character", {"Authorization": f"Bearer {TOKEN}x"}, 403, "forbidden"),
    ("token in upper case", {"Authorization": f"Bearer {TOKEN.upper()}"}, 403, "forbidden"),
    ("token twice", {"Authorization": f"Bearer {TOKEN} {TOKEN}"}, 403, "forbidden"),
    ("non-ASCII token", {"Authorization": "Bearer ünïcödé".encode()}, 403, "forbidden"),
    ("8 KB token", {"Authorization": "Bearer " + "k" * 8192}, 403, "forbidden"),
]


@pytest.mark.parametrize("label,headers,status,code", REFUSED, ids=[r[0] for r in REFUSED])
def test_class_changes_without_the_right_token_are_refused(
    server, responses, reliability_log, label, headers, status, code
):
    name = f"forbidden {uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        add = c.post("/v1/classes", json=_body(name), headers=headers)
        delete = c.delete(f"/v1/classes/{quote(name)}", headers=headers)
        listed = {cl["name"] for cl in c.get("/v1/classes").json()["classes"]}
    responses.extend([add, delete])
    reliability_log.add(
        "auth", requests=3, inputs=1, errors=int(add.status_code >= 500) + int(delete.status_code >= 500)
    )
    for r in (add, delete):
        assert r.status_code == status, (label, r.status_code, r.text)
        assert r.json()["error"]["code"] == code
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
    assert name not in listed


def test_auth_is_checked_before_the_body_is_read(server, responses):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # A body that would be 413 or 422 for an admin is 401/403 for anyone else: nothing of it is parsed.
        huge = c.post("/v1/classes", content=b"x" * (8 * 1024 * 1024), headers={"content-type": "application/json"})
        broken = c.post(
            "/v1/classes",
            content=b"{not json",
            headers={"content-type": "application/json", "Authorization": "Bearer wrong"},
        )
        form = c.post("/v1/classes", data={"name": "x"}, files={"file": ("d.txt", b"\xff\xfe")})
    responses.extend([huge, broken, form])
    assert (huge.status_code, broken.status_code, form.status_code) == (401, 403, 401)


def test_the_right_token_works_and_reads_need_none(server, responses, reliability_log):
    name = f"allowed {uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # The scheme is case-insensitive (RFC 7235); the token is not.
        added = c.post("/v1/classes", json=_body(name), headers={"Authorization": f"bearer {TOKEN}"})
        listed = c.get("/v1/classes")
        model = c.get("/v1/model")
        deleted = c.delete(f"/v1/classes/{quote(name)}", headers={"Authorization": f"Bearer {TOKEN}"})
    responses.extend([added, listed, model, deleted])
    reliability_log.add("auth", requests=4)
    assert added.status_code == 201, added.text
    assert listed.status_code == 200 and model.status_code == 200
    assert deleted.status_code == 200, deleted.text


def test_secrets_never_appear_in_logs_responses_or_metrics(server, redis_server, responses, reliability_log):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # Failures that log: Redis goes away (the link logs its URL) and comes back.
        redis_server.stop()
        deadline = time.monotonic() + 30
        while "vlltr_redis_up 0.0" not in c.get("/metrics").text and time.monotonic() < deadline:
            c.post("/v1/classify", files={"file": ("x.png", _png())})
            time.sleep(0.05)
        outage = c.post("/v1/classes", json=_body("during outage"), headers={"Authorization": f"Bearer {TOKEN}"})
        redis_server.start()
        while "vlltr_redis_up 1.0" not in c.get("/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "vlltr_redis_up 1.0" in c.get("/metrics").text
        extra = [
            outage,
            c.get("/metrics"),
            c.get("/v1/model"),
            c.get("/openapi.json"),
            c.get("/readyz"),
            c.get("/docs"),
            c.get("/nope"),
            c.post("/v1/classify", files={"file": ("x", b"junk")}),
        ]
    assert outage.status_code == 503
    responses.extend(extra)
    reliability_log.add("auth", requests=len(extra), faults=1)
    for r in responses:
        text = r.text + " ".join(f"{k}: {v}" for k, v in r.headers.items())
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked in the answer to {r.request.method} {r.request.url.path}"
    time.sleep(0.2)  # let the last log lines reach the file
    log = server.log_path.read_text(errors="replace")
    assert "Redis at" in log, "the outage was not logged, so the line that names Redis went unchecked"
    for secret in SECRETS:
        assert secret not in log, "a secret leaked into the server log"


def test_cli_help_and_errors_do_not_echo_secrets(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
    env.update({"VLLTR_ADMIN_TOKEN": TOKEN, "VLLTR_CACHE_DIR": str(tmp_path)})
    cli = [sys.executable, "-m", "vlltr.cli", "serve"]
    shown = subprocess.run(cli + ["--help"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--admin-token" in shown.stdout
    # An invalid Redis URL carrying a password, and an invalid setting next to the token: the error names the
    # setting, never the secret.
    bad = subprocess.run(
        cli + ["--redis-url", f"http://admin:{REDIS_PASSWORD}@cache.internal:6379/0", "--port", "70000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--redis-url" in bad.stderr and "--port" in bad.stderr
    for out in (shown.stdout + shown.stderr, bad.stdout + bad.stderr):
        for secret in SECRETS:
            assert secret not in out


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 60, 90)).save(buf, "PNG")
    return buf.getvalue()
