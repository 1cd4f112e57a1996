"""`vlltr.client` against real `vlltr serve` processes (the committed bundle `bundle_v1`): typed answers equal to
the API's JSON, batch helpers chunking any number of images, class changes with the admin token from the
argument or `VLLTR_ADMIN_TOKEN`, errors as `ServiceError`, and 503 + Retry-After retried until it passes;
then `vlltr classify` and `vlltr classes list|add|delete` end to end."""

from __future__ import annotations

import asyncio
import io
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from support.paths import PYTHON
from support.slow_clients import read_until_closed, stalled_raw, status_of
from vlltr.client import AsyncClient, Client, ServiceError

TOKEN = "client-admin-token"


@pytest.fixture(scope="module")
def server(bundle_v1, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("client")
    env = {"VLLTR_CLASS_STORE": str(workdir / "classes.json"), "VLLTR_ADMIN_TOKEN": TOKEN}
    srv = server_factory(env=env, args=["--bundle", str(bundle_v1)], workdir=workdir)
    yield srv
    srv.stop()


def _paths(bundle: Path, n: int) -> list[Path]:
    data = bundle.parent / "run" / "data"
    return [data / line.split()[0] for line in (data / "test.txt").read_text().splitlines()[:n] if line]


def test_classify_returns_the_api_answer_typed(server, bundle_v1):
    path = _paths(bundle_v1, 1)[0]
    raw = httpx.post(
        f"{server.url}/v1/classify",
        files={"file": (path.name, path.read_bytes())},
        params={"top_k": 3, "explain": "true"},
        timeout=30,
    ).json()
    with Client(server.url) as client:
        for image in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
            answer = client.classify(image, top_k=3, explain=True)
            assert [p.class_id for p in answer.predictions] == [p["class_id"] for p in raw["predictions"]]
            assert answer.bundle_id == raw["bundle_id"]
            assert answer.confidence == pytest.approx(raw["confidence"], abs=1e-5)
            assert (answer.unknown, answer.unknown_score) == (None, None)  # bundle_v1 has no fitted threshold
            best = answer.best
            assert best.explanation is not None
            assert best.score == pytest.approx(raw["predictions"][0]["score"], abs=1e-5)
            assert [a.text for a in best.explanation.anchors] == [
                a["text"] for a in raw["predictions"][0]["explanation"]["anchors"]
            ]
        plain = client.classify(path, top_k=2)
        assert len(plain.predictions) == 2 and plain.best.explanation is None
        labels = client.classify(path, labels=["an orange thing", "a purple thing"])
        assert {p.label for p in labels.predictions} == {"an orange thing", "a purple thing"}
        assert all(p.class_id is None for p in labels.predictions)


def test_classify_many_chunks_and_keeps_order_with_per_image_errors(server, bundle_v1):
    paths = _paths(bundle_v1, 5)
    images: list = [paths[0], paths[1], b"not an image", paths[2], paths[3], paths[4]]
    with Client(server.url) as client:
        results = client.classify_many(images, top_k=2, batch_size=2)
        singles = [client.classify(p, top_k=2) for p in paths]
    assert [r.index for r in results] == list(range(6))
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert results[2].error is not None and results[2].error.code == "bad_image" and results[2].status == 400
    for result, single in zip([results[i] for i in (0, 1, 3, 4, 5)], singles):
        assert result.predictions is not None
        assert [p.class_id for p in result.predictions] == [p.class_id for p in single.predictions]


def test_async_client_gives_the_same_answers(server, bundle_v1):
    paths = _paths(bundle_v1, 4)

    async def run():
        async with AsyncClient(server.url) as client:
            one = await client.classify(paths[0], top_k=3)
            many = await client.classify_many(paths, top_k=3, batch_size=1, concurrency=3)
            table = await client.classes()
            return one, many, table

    one, many, table = asyncio.run(run())
    assert [r.index for r in many] == [0, 1, 2, 3] and all(r.ok for r in many)
    assert [p.class_id for p in many[0].predictions or ()] == [p.class_id for p in one.predictions]
    assert len(table.classes) >= 6


def test_class_changes_with_the_token_from_the_argument_or_the_environment(server, monkeypatch):
    monkeypatch.delenv("VLLTR_ADMIN_TOKEN", raising=False)
    with Client(server.url) as anonymous:
        with pytest.raises(ServiceError) as refused:
            anonymous.add_class("teal ring", ["a teal ring on grey"])
        assert refused.value.status == 401 and refused.value.error_code == "unauthorized"
    with Client(server.url, admin_token=TOKEN) as client:
        added = client.add_class("teal ring", ["a teal ring on grey", "a ring painted teal"])
        assert added.created and added.class_id is not None and added.anchors
        again = client.add_class("teal ring", ["a teal ring on grey", "a ring painted teal"])
        assert not again.created  # a retry of an add that succeeded
        assert "teal ring" in {c.name for c in client.classes().classes}
    monkeypatch.setenv("VLLTR_ADMIN_TOKEN", TOKEN)
    with Client(server.url) as client:
        client.delete_class("teal ring")
        assert "teal ring" not in {c.name for c in client.classes().classes}
        with pytest.raises(ServiceError) as missing:
            client.delete_class("teal ring")
        assert missing.value.status == 404
        with pytest.raises(ServiceError) as trained:
            client.delete_class(client.classes().classes[0].name)
        assert trained.value.status == 409 and trained.value.error_code == "conflict"


def test_an_unreachable_service_is_a_service_error(free_port):
    with Client(f"http://127.0.0.1:{free_port()}", retries=0) as client:
        with pytest.raises(ServiceError, match="cannot reach"):
            client.model()


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_a_503_is_retried_after_its_retry_after(bundle_v1, server_factory, tmp_path):
    max_image, budget = 64 * 1024, 70_000
    env = {
        "VLLTR_CLASS_STORE": str(tmp_path / "classes.json"),
        "VLLTR_MAX_IMAGE_BYTES": str(max_image),
        "VLLTR_MAX_BUFFERED_BYTES": str(budget),
        "VLLTR_BODY_READ_TIMEOUT_S": "2",
        "VLLTR_RETRY_AFTER_S": "1",
    }
    # One process whatever VLLTR_TEST_WORKERS says: the body budget is each front-end's own, and the upload that
    # holds it must reach the same process as the request it starves.
    srv = server_factory(env=env, args=["--bundle", str(bundle_v1), "--workers", "1"], workdir=tmp_path)
    image = _noise_png(48)
    assert budget - max_image < len(image) < max_image
    try:
        for retries, succeeds in ((0, False), (10, True)):
            holder = stalled_raw(srv.port, content_length=max_image)  # holds the body budget until its 408
            try:
                time.sleep(0.3)
                with Client(srv.url, retries=retries) as client:
                    started = time.monotonic()
                    if succeeds:
                        answer = client.classify(image, top_k=1)
                        assert answer.predictions and time.monotonic() - started >= 1.0  # it waited, then passed
                    else:
                        with pytest.raises(ServiceError) as full:
                            client.classify(image, top_k=1)
                        assert full.value.status == 503 and full.value.error_code == "queue_full"
                received, _ = read_until_closed([holder], timeout=15)
                assert status_of(received[0]) == 408
            finally:
                holder.close()
    finally:
        srv.stop()


def _vlltr(*args: str, env_token: str | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    env.pop("VLLTR_ADMIN_TOKEN", None)
    if env_token is not None:
        env["VLLTR_ADMIN_TOKEN"] = env_token
    return subprocess.run(
        [PYTHON, "-m", "vlltr.cli", *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_the_classify_and_classes_commands_work_end_to_end(server, bundle_v1, tmp_path):
    paths = _paths(bundle_v1, 2)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    done = _vlltr("classify", str(paths[0]), str(paths[1]), "--url", server.url, "--top-k", "2", "--explain")
    assert done.returncode == 0, done.stderr
    with Client(server.url) as client:
        expected = client.classify(paths[0], top_k=2, explain=True)
    assert f"{paths[0]}:" in done.stdout and expected.best.label in done.stdout
    assert expected.best.explanation is not None and expected.best.explanation.anchors[0].text in done.stdout
    failed = _vlltr("classify", str(junk), "--url", server.url)
    assert failed.returncode == 1 and "bad_image" in failed.stdout
    missing = _vlltr("classify", str(tmp_path / "nope.png"), "--url", server.url)
    assert missing.returncode == 2 and "no such image file" in missing.stderr

    refused = _vlltr("classes", "add", "olive dot", "an olive green dot", "--url", server.url)
    assert refused.returncode == 2 and "401" in refused.stderr
    added = _vlltr("classes", "add", "olive dot", "an olive green dot", "a small olive circle", "--url", server.url,
                   env_token=TOKEN)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "added olive dot" in added.stdout
    listed = _vlltr("classes", "list", "--url", server.url)
    assert listed.returncode == 0 and "olive dot" in listed.stdout and "added" in listed.stdout
    deleted = _vlltr("classes", "delete", "olive dot", "--url", server.url, "--token", TOKEN)
    assert deleted.returncode == 0, deleted.stderr
    assert "olive dot" not in _vlltr("classes", "list", "--url", server.url).stdout
    unreachable = _vlltr("classes", "list", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
