"""The multi-process service (`vlltr serve --workers 2`: two HTTP front-ends and one engine), with real processes.

- a class added through one front-end is scored and listed by the other in the same round of requests;
- `/metrics`, whichever front-end answers it, counts the requests of every front-end;
- SIGKILL of a front-end under load: the other keeps serving, and a new front-end takes its place;
- SIGKILL of the engine under load: every request it held is answered (503 `not_ready` with Retry-After,
  never a hang or a 500), `/readyz` says not ready, the engine is started again and service resumes;
- SIGTERM under load: a request in flight (its body half sent) is still answered 200, then all processes exit;
- a burst of keep-alive connections opened at once is spread over both front-ends (each listens on its own
  `SO_REUSEPORT` socket), and a port another program holds ends the command with one line and status 2.

Which front-end answered is read from `X-Vlltr-Worker` (its pid), which every answer of a front-end carries.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from support.workers import Load, counter, engine_pid, frontend_pids

WORKERS = ["--workers", "2"]


def _image(bundle: Path) -> bytes:
    data = bundle.parent / "run" / "data"
    name = (data / "test.txt").read_text().split()[0]
    return (data / name).read_bytes()


def _start(server_factory, tmp_path_factory, bundle: Path, name: str, **env: str):
    workdir = tmp_path_factory.mktemp(name)
    settings = {"VLLTR_CLASS_STORE": str(workdir / "classes.jsonl"), **env}
    return server_factory(env=settings, args=["--bundle", str(bundle), *WORKERS], workdir=workdir)


def _classify(client: httpx.Client, image: bytes, **params) -> httpx.Response:
    # A new connection per request, so that the kernel may hand it to either front-end.
    return client.post(
        "/v1/classify", content=image, params=params, headers={"content-type": "image/jpeg", "connection": "close"}
    )


def _until_both(client: httpx.Client, image: bytes, pids: int = 2, tries: int = 400, **params) -> dict:
    """Classify until `pids` distinct front-ends have answered; {pid: last answer} (every answer must be 200)."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(tries):
        r = _classify(client, image, **params)
        assert r.status_code == 200, r.text
        seen[r.headers["x-vlltr-worker"]] = r
        if len(seen) >= pids:
            return seen
    raise AssertionError(f"only front-ends {sorted(seen)} answered {tries} requests")


@pytest.fixture(scope="module")
def server(bundle_v1, server_factory, tmp_path_factory):
    srv = _start(server_factory, tmp_path_factory, bundle_v1, "workers")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_two_frontends_answer_and_one_engine_serves_them(server, client, bundle_v1):
    seen = _until_both(client, _image(bundle_v1), top_k=3)
    assert set(seen) == {str(p) for p in frontend_pids(server.log(tail=None))}
    bodies = [r.json() for r in seen.values()]
    assert bodies[0]["predictions"] == bodies[1]["predictions"]  # the same engine, the same table


def test_a_class_added_through_one_frontend_is_served_by_the_other(client, bundle_v1):
    image = _image(bundle_v1)
    added = client.post(
        "/v1/classes",
        json={"name": "striped kite", "descriptions": ["a photo of a striped kite", "a kite with stripes"]},
        headers={"connection": "close"},
    )
    assert added.status_code == 201, added.text
    version, through = added.json()["class_table_version"], added.headers["x-vlltr-worker"]
    # The very next round: every front-end scores against the table with the class (top_k covers all classes).
    seen = _until_both(client, image, top_k=7)
    assert through in seen
    for pid, r in seen.items():
        body = r.json()
        assert body["class_table_version"] >= version, pid
        assert "striped kite" in [p["label"] for p in body["predictions"]], pid
    listed: dict[str, list[str]] = {}
    for _ in range(200):
        r = client.get("/v1/classes", headers={"connection": "close"})
        assert r.status_code == 200
        listed[r.headers["x-vlltr-worker"]] = [c["name"] for c in r.json()["classes"]]
        if len(listed) == 2:
            break
    assert len(listed) == 2 and all("striped kite" in names for names in listed.values())


def test_a_burst_of_keep_alive_connections_is_spread_over_the_frontends(server):
    """32 connections opened at once, as a load generator does, then a request on each: on one shared listening
    socket the front-end that woke first accepted all of them. With a socket each, the kernel hashes each
    connection to one: both get a share (fewer than 4 of 32 for either has a chance of about 1 in 10^6)."""
    port = int(server.url.rsplit(":", 1)[1])
    conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(32)]
    workers = []
    try:
        for conn in conns:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for conn in conns:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                assert chunk, "connection closed before the answer"
                head += chunk
            fields = dict(
                line.split(b": ", 1) for line in head.split(b"\r\n\r\n")[0].lower().split(b"\r\n")[1:] if b": " in line
            )
            workers.append(fields[b"x-vlltr-worker"].decode())
    finally:
        for conn in conns:
            conn.close()
    shares = {w: workers.count(w) for w in set(workers)}
    assert len(shares) == 2 and min(shares.values()) >= 4, shares


def test_a_port_in_use_ends_the_command_with_one_line(bundle_v1, tmp_path):
    from support.paths import PYTHON

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
        env["VLLTR_CLASS_STORE"] = str(tmp_path / "classes.jsonl")
        done = subprocess.run(
            [PYTHON, "-m", "vlltr.cli", "serve", "--bundle", str(bundle_v1), *WORKERS, "--port", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_metrics_count_the_requests_of_every_frontend(client, bundle_v1):
    image = _image(bundle_v1)
    before = counter(client.get("/metrics").text, "vlltr_request_duration_seconds_count", route="/v1/classify")
    pids: set[str] = set()
    sent = 0
    while len(pids) < 2 or sent < 20:
        r = _classify(client, image)
        assert r.status_code == 200
        pids.add(r.headers["x-vlltr-worker"])
        sent += 1
        assert sent < 400, f"only front-ends {pids} answered"
    for _ in range(2):  # whichever front-end answers the scrape
        text = client.get("/metrics", headers={"connection": "close"}).text
        after = counter(text, "vlltr_request_duration_seconds_count", route="/v1/classify")
        assert after - before == sent
    assert counter(text, "vlltr_predictions_total") >= sent  # counted by the engine
    assert "vlltr_model_info{" in text


def test_sigkill_of_a_frontend_under_load(bundle_v1, server_factory, tmp_path_factory):
    srv = _start(server_factory, tmp_path_factory, bundle_v1, "workers-kill-frontend")
    image = _image(bundle_v1)
    load = Load(srv.url, image, threads=4).start()
    try:
        assert load.wait_for(lambda a: len({x.worker for x in a if x.status == 200}) == 2, 60), "both front-ends"
        victim = int(next(x.worker for x in load.answers if x.status == 200 and x.worker))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # The other front-end keeps serving at once ...
        assert load.wait_for(lambda a: sum(x.status == 200 and x.sent > killed_at + 0.2 for x in a) >= 20, 30)
        # ... and a new front-end takes the dead one's place.
        assert load.wait_for(
            lambda a: (
                any(x.status == 200 and x.worker and int(x.worker) not in (victim,) and x.sent > killed_at for x in a)
                and len({x.worker for x in a if x.status == 200 and x.sent > killed_at}) == 2
            ),
            60,
        ), srv.log()
    finally:
        answers = load.stop()
        srv.stop()
    after = [a for a in answers if a.sent > killed_at]
    assert not any(a.worker == str(victim) for a in after if a.sent > killed_at + 0.5)
    assert all(a.status in (200, None) for a in answers), {a.status for a in answers}
    # Only requests the killed process held (at most one per load thread) lose their connection.
    assert sum(a.status is None for a in answers) <= load.threads, [a.error for a in answers if a.status is None]
    assert len(frontend_pids(srv.log(tail=None))) == 3


def test_sigkill_of_the_engine_under_load(bundle_v1, server_factory, tmp_path_factory):
    srv = _start(server_factory, tmp_path_factory, bundle_v1, "workers-kill-engine")
    image = _image(bundle_v1)
    first_engine = engine_pid(srv.log(tail=None))
    load = Load(srv.url, image, threads=6).start()
    not_ready_seen = False
    try:
        assert load.wait_for(lambda a: sum(x.status == 200 for x in a) >= 20, 30)
        os.kill(first_engine, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 10
        while time.monotonic() < deadline and not not_ready_seen:
            r = httpx.get(f"{srv.url}/readyz", headers={"connection": "close"}, timeout=5)
            not_ready_seen = r.status_code == 503 and r.json()["ready"] is False
            time.sleep(0.02)
        assert load.wait_for(lambda a: any(x.status == 200 and x.sent > killed_at + 1 for x in a), 90), srv.log()
        restarted = time.monotonic()
        # Each front-end links to the new engine on its own (within a reconnect and a status poll), and a new
        # connection may reach either: ready again once every front-end says so.
        assert _ready_everywhere(srv.url, 10), srv.log()
        assert load.wait_for(lambda a: sum(x.status == 200 and x.sent > restarted for x in a) >= 20, 30)
    finally:
        answers = load.stop()  # asserts no request is left hanging
        srv.stop()
    assert not_ready_seen, "/readyz never said not ready after the engine was killed"
    assert engine_pid(srv.log(tail=None)) != first_engine
    refused = [a for a in answers if a.status != 200]
    assert refused, "no request was refused while the engine was down"
    for a in refused:  # every request the dead engine held, or that came meanwhile: a 503 to retry, never a 500
        assert a.status == 503 and a.retry_after and a.code == "not_ready", a


def _ready_everywhere(url: str, timeout_s: float) -> bool:
    """Whether /readyz says ready on 20 new connections in a row (they spread over the front-ends) within
    `timeout_s`."""
    deadline, in_a_row = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and in_a_row < 20:
        ready = httpx.get(f"{url}/readyz", headers={"connection": "close"}, timeout=5).status_code == 200
        in_a_row = in_a_row + 1 if ready else 0
        time.sleep(0.01)
    return in_a_row >= 20


def _multipart_head(url_port: int, image: bytes) -> tuple[bytes, bytes]:
    boundary = "vlltrboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/classify?top_k=2 HTTP/1.1\r\nHost: 127.0.0.1:{url_port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head, body


def test_sigterm_drains_requests_in_flight(bundle_v1, server_factory, tmp_path_factory):
    srv = _start(server_factory, tmp_path_factory, bundle_v1, "workers-sigterm")
    image = _image(bundle_v1)
    supervisor = srv.proc
    assert supervisor is not None
    children = frontend_pids(srv.log(tail=None)) + [engine_pid(srv.log(tail=None))]
    load = Load(srv.url, image, threads=4).start()
    socks = []
    try:
        assert load.wait_for(lambda a: sum(x.status == 200 for x in a) >= 10, 30)
        # Requests in flight at the signal: their head and half their body sent.
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
            head, body = _multipart_head(srv.port, image)
            s.sendall(head + body[: len(body) // 2])
            socks.append((s, body[len(body) // 2 :]))
        time.sleep(0.5)
        supervisor.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        for s, rest in socks:
            s.sendall(rest)
        answers = []
        for s, _ in socks:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answers.append(data)
    finally:
        for s, _ in socks:
            s.close()
        load.stop()
    for data in answers:
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
        assert b'"predictions"' in data
    assert supervisor.wait(20) == 0, srv.log()
    srv.proc = None
    for pid in children:  # every process is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
