"""End to end against a real `vlltr serve` process: classify, batch, classes added by text, restarts,
offline/online agreement, OpenAPI and the process never importing torch.

One server (local class store, admin token, small limits) is shared by the whole module.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.head import ClassEntry, build_added_class_anchors
from vlltr.model.runtime.predictor import BundlePredictor
from vlltr.model.runtime.prompts import name_prompts
from vlltr.service.settings import Settings

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _images(bundle: Path, n: int) -> list[tuple[str, bytes]]:
    """`n` of the generated test images (PNG and JPEG, assorted sizes) as (filename, bytes)."""
    data = bundle.parent / "run" / "data"
    lines = (data / "test.txt").read_text().split("\n")[:n]
    return [(Path(line.split()[0]).name, (data / line.split()[0]).read_bytes()) for line in lines if line]


@pytest.fixture(scope="module")
def server(service_bundle, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("api")
    env = {
        "VLLTR_ADMIN_TOKEN": TOKEN,
        "VLLTR_MAX_DESCRIPTIONS": "8",
        "VLLTR_CLASS_STORE": str(workdir / "classes.json"),
        "VLLTR_INFERENCE_LANES": "2",  # two batches at once, whatever the machine's cores
    }
    args = ["--bundle", str(service_bundle), "--max-batch-size", "8", "--max-wait-ms", "2"]
    srv = server_factory(env=env, args=args, workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def predictor(service_bundle):
    return BundlePredictor(load_bundle(service_bundle), provider="cpu")


def _classify(client, name, data, top_k=5):
    r = client.post("/v1/classify", params={"top_k": top_k}, files={"file": (name, data)})
    assert r.status_code == 200, r.text
    return r.json()


def test_model_health_and_readiness(client, service_bundle):
    bundle = load_bundle(service_bundle)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    info = client.get("/v1/model").json()
    assert info["bundle_id"] == bundle.bundle_id
    assert info["arch"] == "vlltr-tiny-vit"
    assert info["provider"] == "cpu"
    assert info["precision"] == "fp32"
    assert info["classes"]["trained"] == bundle.num_classes
    assert info["batch_buckets"] == [1, 2, 4, 8]
    assert info["inference_lanes"] == 2
    assert info["encoder_threads"] == Settings(inference_lanes=2).encoder_threads(2)  # the cores split among lanes
    assert isinstance(info["class_table_version"], int)


def test_classify_matches_offline_predictions(client, predictor, service_bundle):
    bundle = predictor.bundle
    for name, data in _images(service_bundle, 12):
        body = _classify(client, name, data, top_k=bundle.num_classes)
        assert body["bundle_id"] == bundle.bundle_id
        expected = predictor.top_k([Image.open(io.BytesIO(data))], k=bundle.num_classes)[0]
        got = {p["class_id"]: p["score"] for p in body["predictions"]}
        assert set(got) == {p.class_id for p in expected}
        for p in expected:
            assert got[p.class_id] == pytest.approx(p.score, abs=1e-5)
        assert body["predictions"][0]["class_id"] == expected[0].class_id
        assert body["predictions"][0]["label"] == expected[0].label
        scores = [p["score"] for p in body["predictions"]]
        assert scores == sorted(scores, reverse=True)


def test_concurrent_requests_each_get_their_own_images_answer(client, predictor, service_bundle):
    # Two lanes run batches side by side; each fills its own batch arrays, so no image is scored on another's
    # pixels however the requests interleave.
    from concurrent.futures import ThreadPoolExecutor

    images = _images(service_bundle, 24) * 4
    expected = {
        name: predictor.top_k([Image.open(io.BytesIO(data))], k=3)[0] for name, data in images[: len(images) // 4]
    }

    def ask(item: tuple[str, bytes]) -> tuple[str, dict]:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
            return item[0], _classify(own, item[0], item[1], top_k=3)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, images))
    for name, body in answers:
        assert [p["class_id"] for p in body["predictions"]] == [p.class_id for p in expected[name]], name
        for got, want in zip(body["predictions"], expected[name]):
            assert got["score"] == pytest.approx(want.score, abs=1e-5), name


def test_top_k_limits_the_answer(client, service_bundle):
    name, data = _images(service_bundle, 1)[0]
    assert len(_classify(client, name, data, top_k=2)["predictions"]) == 2
    # More than there are classes: every class, once.
    assert len(_classify(client, name, data, top_k=50)["predictions"]) == load_bundle(service_bundle).num_classes


def test_batch_returns_one_result_or_error_per_image_in_order(client, predictor, service_bundle):
    images = _images(service_bundle, 3)
    files = [
        ("files", images[0]),
        ("files", ("junk.bin", b"certainly not an image")),
        ("files", images[1]),
        ("files", images[2]),
    ]
    r = client.post("/v1/classify/batch", params={"top_k": 3}, files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [item["index"] for item in results] == [0, 1, 2, 3]
    assert [item["filename"] for item in results] == [images[0][0], "junk.bin", images[1][0], images[2][0]]
    assert results[1]["status"] == 400 and results[1]["error"]["code"] == "bad_image"
    assert results[1]["predictions"] is None
    for item, (name, data) in zip([results[0], results[2], results[3]], images):
        assert item["status"] == 200 and item["error"] is None
        single = _classify(client, name, data, top_k=3)
        assert [p["class_id"] for p in item["predictions"]] == [p["class_id"] for p in single["predictions"]]
        for a, b in zip(item["predictions"], single["predictions"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_add_class_from_json_is_served_and_scored_like_offline(client, predictor, service_bundle):
    descriptions = [
        "a red square on a noisy background",
        "a bright red block",
        "red paint in a square shape",
        "a red square on a noisy background",
    ]  # the duplicate line is dropped
    r = client.post("/v1/classes", json={"name": "Red Block", "descriptions": descriptions}, headers=AUTH)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["name"] == "Red Block" and created["source"] == "added"
    assert created["num_descriptions"] == 3
    assert sorted(created["anchors"]) == sorted(descriptions[:3])
    version = created["class_table_version"]
    num_trained = predictor.bundle.num_classes
    assert created["class_id"] == num_trained

    listed = client.get("/v1/classes").json()
    assert listed["class_table_version"] >= version
    entry = next(c for c in listed["classes"] if c["name"] == "Red Block")
    assert entry["source"] == "added" and entry["tier"] == "added" and entry["train_count"] == 0

    # Offline: the same text encoder, anchor choice and head give the same score for the added class.
    # The anchors' order depends on the classes served when it was added; the scores do not.
    feats = predictor.text_encoder.encode_texts(descriptions[:3])
    reference = predictor.text_encoder.encode_texts(name_prompts("Red Block"))
    anchors, mask, chosen = build_added_class_anchors(feats, predictor.bundle.num_anchors, reference=reference)
    assert sorted(descriptions[i] for i in chosen) == sorted(created["anchors"])
    table = predictor.bundle.class_table().with_added([ClassEntry("Red Block", anchors, mask)], predictor.bundle.head)
    for name, data in _images(service_bundle, 4):
        body = _classify(client, name, data, top_k=num_trained + 1)
        assert body["class_table_version"] >= version
        got = {p["label"]: p["score"] for p in body["predictions"]}
        predictor.table, base = table, predictor.table
        try:
            probs = predictor.probabilities_from_features(predictor.image_features([Image.open(io.BytesIO(data))]))
        finally:
            predictor.table = base
        assert got["Red Block"] == pytest.approx(float(probs[0, num_trained]), abs=1e-5)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-4)


def test_add_class_from_uploaded_text_file(client):
    text = b"a blue circle\n\n  a round blue disc  \r\na circle painted blue\n"
    r = client.post(
        "/v1/classes", data={"name": "blue disc"}, files={"file": ("disc.txt", text, "text/plain")}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["num_descriptions"] == 3
    assert sorted(body["anchors"]) == ["a blue circle", "a circle painted blue", "a round blue disc"]
    names = [c["name"] for c in client.get("/v1/classes").json()["classes"]]
    assert "blue disc" in names


def test_duplicate_names_conflict_case_insensitively(client):
    r = client.post("/v1/classes", json={"name": "Green Thing", "descriptions": ["something green"]}, headers=AUTH)
    assert r.status_code == 201
    for name in ("Green Thing", "GREEN thing", "green thing"):
        r = client.post("/v1/classes", json={"name": name, "descriptions": ["x"]}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    r = client.post("/v1/classes", json={"name": "CLASS 0", "descriptions": ["x"]}, headers=AUTH)
    assert r.status_code == 409 and "trained" in r.json()["error"]["message"]


def test_near_duplicates_are_reported_not_refused(client):
    # Same text as an existing added class: cosine 1 with it.
    r = client.post(
        "/v1/classes", json={"name": "Green Thing Again", "descriptions": ["something green"]}, headers=AUTH
    )
    assert r.status_code == 201
    dups = r.json()["near_duplicates"]
    assert dups and dups[0]["name"] == "Green Thing" and dups[0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert r.json()["warnings"]


def test_admin_token_is_required_for_changes(client):
    body = {"name": "needs auth", "descriptions": ["x"]}
    r = client.post("/v1/classes", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/classes", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.post("/v1/classes", json=body, headers={"Authorization": "Basic c2VjcmV0"})
    assert r.status_code == 401
    r = client.delete("/v1/classes/Green%20Thing", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403
    assert TOKEN not in r.text


def test_delete_added_class_and_refuse_trained_or_unknown(client):
    r = client.post("/v1/classes", json={"name": "short lived", "descriptions": ["gone soon"]}, headers=AUTH)
    assert r.status_code == 201
    version = r.json()["class_table_version"]
    r = client.delete("/v1/classes/SHORT%20LIVED", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "name": "short lived",
        "deleted": True,
        "bundle_id": r.json()["bundle_id"],
        "class_table_version": version + 1,
    }
    assert "short lived" not in [c["name"] for c in client.get("/v1/classes").json()["classes"]]
    r = client.delete("/v1/classes/short%20lived", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.delete("/v1/classes/class%200", headers=AUTH)
    assert r.status_code == 409 and "trained class" in r.json()["error"]["message"]


def test_every_change_bumps_the_version(client):
    before = client.get("/v1/classes").json()["class_table_version"]
    r = client.post("/v1/classes", json={"name": "v1", "descriptions": ["one"]}, headers=AUTH)
    assert r.json()["class_table_version"] == before + 1
    r = client.delete("/v1/classes/v1", headers=AUTH)
    assert r.json()["class_table_version"] == before + 2
    assert client.get("/v1/model").json()["class_table_version"] == before + 2


def test_added_classes_survive_a_restart(server, service_bundle):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/classes", json={"name": "durable", "descriptions": ["kept across restarts"]}, headers=AUTH)
        assert r.status_code == 201
        before = c.get("/v1/classes").json()
    server.restart()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        after = c.get("/v1/classes").json()
        assert after["class_table_version"] == before["class_table_version"]
        assert [x["name"] for x in after["classes"]] == [x["name"] for x in before["classes"]]
        assert next(x for x in after["classes"] if x["name"] == "durable")["anchors"] == ["kept across restarts"]
        name, data = _images(service_bundle, 1)[0]
        body = _classify(c, name, data, top_k=50)
        assert "durable" in [p["label"] for p in body["predictions"]]


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert made and " " not in made


def test_openapi_documents_every_route_field_and_error(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # 422 uses the error envelope, not FastAPI's default
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    assert set(schemas["ErrorBody"]["required"]) == {"code", "message"}
    expected_errors = {
        ("/v1/classify", "post"): {"400", "413", "415", "422", "503"},
        ("/v1/classify/batch", "post"): {"413", "415", "422", "503"},
        ("/v1/classes", "post"): {"401", "403", "409", "413", "415", "422", "503"},
        ("/v1/classes/{name}", "delete"): {"401", "403", "404", "409", "422", "503"},
        ("/v1/classes", "get"): {"503"},
        ("/v1/model", "get"): {"503"},
    }
    for (path, method), statuses in expected_errors.items():
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, method, set(responses))
        for status in statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), (path, status)
            assert responses[status]["description"]
        assert "requestBody" in spec["paths"][path][method] or method in ("get", "delete")
    assert "Retry-After" in spec["paths"]["/v1/classify"]["post"]["responses"]["503"]["headers"]
    undocumented = [
        f"{name}.{prop}"
        for name, schema in schemas.items()
        for prop, field in schema.get("properties", {}).items()
        if not field.get("description")
    ]
    assert undocumented == []


def test_server_process_never_loads_torch(server):
    libs = Path(f"/proc/{server.pid}/maps").read_text()  # the libraries mapped into the process (Linux)
    assert "libtorch" not in libs and "libc10" not in libs


def test_service_imports_without_torch():
    from support.runs import run_without_torch

    script = """
        import vlltr.service.app, vlltr.service.cli, vlltr.service.core, vlltr.service.demo
        from vlltr.service.app import create_app
        from vlltr.service.settings import Settings
        create_app(Settings(bundle="/nonexistent")).openapi()
    """
    result = run_without_torch(script)
    assert result.returncode == 0, result.stderr
