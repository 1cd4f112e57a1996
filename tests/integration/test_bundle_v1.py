"""A bundle exported by the previous version (tests/fixtures/bundle-v1, written before the code moved under
`vlltr/`) loads and serves with this version: a real `vlltr serve` classifies its run's test images as the
offline predictor does and adds a class from text."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.predictor import BundlePredictor

TOKEN = "bundle-v1-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _images(bundle: Path) -> list[tuple[str, bytes]]:
    """Every test image of the run the bundle was exported from, as (filename, bytes)."""
    data = bundle.parent / "run" / "data"
    lines = [line for line in (data / "test.txt").read_text().split("\n") if line]
    return [(Path(line.split()[0]).name, (data / line.split()[0]).read_bytes()) for line in lines]


@pytest.fixture(scope="module")
def server(bundle_v1, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bundle-v1")
    env = {"VLLTR_ADMIN_TOKEN": TOKEN, "VLLTR_CLASS_STORE": str(workdir / "classes.json")}
    srv = server_factory(env=env, args=["--bundle", str(bundle_v1)], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_previous_version_bundle_is_served_as_exported(client, bundle_v1):
    manifest = json.loads((bundle_v1 / "manifest.json").read_text())
    info = client.get("/v1/model").json()
    assert info["bundle_id"] == manifest["bundle_id"] and info["arch"] == manifest["model"]["arch"]
    assert info["classes"]["trained"] == manifest["head"]["num_classes"] == 6
    classes = client.get("/v1/classes").json()["classes"]
    assert [c["name"] for c in classes] == [f"class {i}" for i in range(6)]
    assert all(c["source"] == "trained" for c in classes)


def test_previous_version_bundle_classifies_like_offline(client, bundle_v1):
    predictor = BundlePredictor(load_bundle(bundle_v1), provider="cpu")
    images = _images(bundle_v1)
    assert len(images) == 16
    for name, data in images:
        r = client.post("/v1/classify", params={"top_k": 6}, files={"file": (name, data)})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = predictor.top_k([Image.open(io.BytesIO(data))], k=6)[0]
        assert [p["class_id"] for p in body["predictions"]] == [p.class_id for p in expected]
        for got, want in zip(body["predictions"], expected):
            assert got["label"] == want.label and got["score"] == pytest.approx(want.score, abs=1e-5)


def test_previous_version_bundle_takes_a_class_added_by_text(client, bundle_v1):
    version = client.get("/v1/classes").json()["class_table_version"]
    descriptions = ["a red square on a noisy background", "a bright red block", "red paint in a square shape"]
    r = client.post("/v1/classes", json={"name": "Red Block", "descriptions": descriptions}, headers=AUTH)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["class_id"] == 6 and created["class_table_version"] > version
    assert sorted(created["anchors"]) == sorted(descriptions)
    name, data = _images(bundle_v1)[0]
    body = client.post("/v1/classify", params={"top_k": 7}, files={"file": (name, data)}).json()
    scores = {p["label"]: p["score"] for p in body["predictions"]}
    assert set(scores) == {f"class {i}" for i in range(6)} | {"Red Block"}
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert body["class_table_version"] == created["class_table_version"]
    assert client.delete("/v1/classes/Red Block", headers=AUTH).status_code == 200
