"""Classify options and inputs against a real `vlltr serve` (the committed bundle `bundle_v1`, no torch):
explanations (attention weights over the real anchors summing to 1, branch probabilities recombining to the
fused score with the bundle's alpha, and its temperature when it tempers the mixture), the class subset
filter, ad-hoc labels (zero-shot through the bundle's text encoder, recomputed here with the torch-free
runtime), JSON with base64 images, and every error path as the JSON envelope with its status."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.head import unit_mean
from vlltr.model.runtime.preprocess import preprocess_batch
from vlltr.model.runtime.prompts import name_prompts
from vlltr.model.runtime.sessions import ImageEncoder, TextEncoder
from vlltr.service.explain import MAX_LABELS

ADMIN = "options-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MAX_IMAGE_BYTES = 200_000


@pytest.fixture(scope="module")
def server(bundle_v1, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("options")
    env = {
        "VLLTR_CLASS_STORE": str(workdir / "classes.json"),
        "VLLTR_ADMIN_TOKEN": ADMIN,
        "VLLTR_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "VLLTR_MAX_BATCH_FILES": "4",
    }
    srv = server_factory(env=env, args=["--bundle", str(bundle_v1)], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(bundle_v1) -> dict:
    return json.loads((bundle_v1 / "manifest.json").read_text())


def _images(bundle: Path, n: int) -> list[tuple[str, bytes]]:
    data = bundle.parent / "run" / "data"
    names = [line.split()[0] for line in (data / "test.txt").read_text().splitlines()[:n] if line]
    return [(Path(name).name, (data / name).read_bytes()) for name in names]


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def _classify(client: httpx.Client, data: bytes, **params) -> httpx.Response:
    return client.post("/v1/classify", files={"file": ("image.png", data)}, params=params)


def _same(a: list[dict], b: list[dict]) -> None:
    """Same predictions up to float noise (images scored in batches of another size round differently)."""
    assert [p["class_id"] for p in a] == [p["class_id"] for p in b]
    for p, q in zip(a, b):
        assert p["score"] == pytest.approx(q["score"], abs=1e-5)
        if p["explanation"] is not None or q["explanation"] is not None:
            assert [x["text"] for x in p["explanation"]["anchors"]] == [x["text"] for x in q["explanation"]["anchors"]]


def _anchors(client: httpx.Client) -> dict[str, list[str]]:
    return {c["name"]: c["anchors"] for c in _ok(client.get("/v1/classes"))["classes"]}


def _check_explanation(prediction: dict, anchors: list[str], alpha: float) -> None:
    """A format-1 bundle's explanation: its branches carry the temperature, so they mix to the score."""
    explanation = prediction["explanation"]
    assert explanation is not None
    weights = [a["weight"] for a in explanation["anchors"]]
    assert sorted(a["text"] for a in explanation["anchors"]) == sorted(anchors)  # the class's real anchors
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert weights == sorted(weights, reverse=True) and all(w >= 0 for w in weights)
    assert explanation["alpha"] == pytest.approx(alpha) and explanation["temperature"] == 1.0
    fused = alpha * explanation["vision"] + (1 - alpha) * explanation["language"]
    assert prediction["score"] == pytest.approx(fused, abs=1e-5)


@pytest.fixture(scope="module")
def fused_bundle(bundle_v1, tmp_path_factory) -> Path:
    """`bundle_v1` as format 2 writes it: the temperature (1.4) tempers the fused distribution."""
    root = tmp_path_factory.mktemp("fused-bundle")
    shutil.copytree(bundle_v1.parent / "run", root / "run")
    shutil.copytree(bundle_v1, root / "bundle")
    path = root / "bundle" / "manifest.json"
    m = json.loads(path.read_text())
    m["format_version"], m["calibration"]["temperature_on"] = 2, "fused"
    path.write_text(json.dumps(m))
    return root / "bundle"


def test_explanations_of_a_bundle_that_tempers_the_mixture(fused_bundle, server_factory, tmp_path_factory):
    m = json.loads((fused_bundle / "manifest.json").read_text())
    alpha, t, n = m["head"]["alpha"], m["calibration"]["temperature"], m["head"]["num_classes"]
    assert t != 1.0
    workdir = tmp_path_factory.mktemp("fused-options")
    srv = server_factory(env={"VLLTR_CLASS_STORE": str(workdir / "c.json")}, args=["--bundle", str(fused_bundle)])
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for _, data in _images(fused_bundle, 3):
                plain = _ok(_classify(client, data, top_k=n))["predictions"]
                got = _ok(_classify(client, data, top_k=n, explain="true"))["predictions"]
                assert [(p["label"], pytest.approx(p["score"], abs=1e-5)) for p in got] == [
                    (p["label"], p["score"]) for p in plain
                ]
                e = {p["label"]: p["explanation"] for p in got}
                assert all(x["temperature"] == pytest.approx(t) for x in e.values())
                mixture = {c: alpha * x["vision"] + (1 - alpha) * x["language"] for c, x in e.items()}
                total = sum(v ** (1 / t) for v in mixture.values())
                for p in got:  # score = mixture ** (1 / T), renormalised; the ranking is the mixture's
                    assert p["score"] == pytest.approx(mixture[p["label"]] ** (1 / t) / total, abs=1e-5)
                assert [p["label"] for p in got] == sorted(mixture, key=lambda c: -mixture[c])
                subset = [got[-1]["label"], got[1]["label"]]
                part = _ok(_classify(client, data, top_k=2, classes=subset, explain="true"))["predictions"]
                vis, lin = (sum(e[c][k] for c in subset) for k in ("vision", "language"))
                sub_mix = {c: alpha * e[c]["vision"] / vis + (1 - alpha) * e[c]["language"] / lin for c in subset}
                sub_total = sum(v ** (1 / t) for v in sub_mix.values())
                for p in part:
                    assert p["score"] == pytest.approx(sub_mix[p["label"]] ** (1 / t) / sub_total, abs=1e-5)
    finally:
        srv.stop()


def test_explain_gives_branch_probabilities_and_weighted_anchors(client, bundle_v1, manifest):
    anchors = _anchors(client)
    alpha = manifest["head"]["alpha"]
    n = manifest["head"]["num_classes"]
    for _, data in _images(bundle_v1, 4):
        plain = _ok(_classify(client, data, top_k=n))
        explained = _ok(_classify(client, data, top_k=n, explain="true"))
        assert all(p["explanation"] is None for p in plain["predictions"])  # nothing computed when off
        assert [p["class_id"] for p in explained["predictions"]] == [p["class_id"] for p in plain["predictions"]]
        for p, q in zip(explained["predictions"], plain["predictions"]):
            assert p["score"] == pytest.approx(q["score"], abs=1e-5)
            _check_explanation(p, anchors[p["label"]], alpha)
        # Each branch is a distribution over the classes.
        assert sum(p["explanation"]["vision"] for p in explained["predictions"]) == pytest.approx(1.0, abs=1e-4)
        assert sum(p["explanation"]["language"] for p in explained["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_explain_in_a_batch_explains_every_image(client, bundle_v1, manifest):
    anchors = _anchors(client)
    images = _images(bundle_v1, 3)
    files = [("files", (name, data)) for name, data in images] + [("files", ("junk.bin", b"not an image"))]
    body = _ok(client.post("/v1/classify/batch", files=files, params={"top_k": 2, "explain": "true"}))
    assert [it["status"] for it in body["results"]] == [200, 200, 200, 400]
    for item, (_, data) in zip(body["results"], images):
        single = _ok(_classify(client, data, top_k=2, explain="true"))
        _same(item["predictions"], single["predictions"])
        for p in item["predictions"]:
            _check_explanation(p, anchors[p["label"]], manifest["head"]["alpha"])


def test_an_added_class_is_explained_by_its_own_descriptions(client, bundle_v1):
    descriptions = ["a small green triangle", "three green corners on grey", "a green wedge shape"]
    r = client.post("/v1/classes", json={"name": "green wedge", "descriptions": descriptions}, headers=AUTH)
    assert r.status_code in (200, 201), r.text
    chosen = r.json()["anchors"]
    _, data = _images(bundle_v1, 1)[0]
    body = _ok(_classify(client, data, top_k=1, explain="true", classes="green wedge"))
    (p,) = body["predictions"]
    assert p["label"] == "green wedge" and p["score"] == pytest.approx(1.0, abs=1e-5)
    explanation = p["explanation"]
    assert sorted(a["text"] for a in explanation["anchors"]) == sorted(chosen)
    assert sum(a["weight"] for a in explanation["anchors"]) == pytest.approx(1.0, abs=1e-5)
    # This bundle's vision branch does not score added classes: alone in the subset, the language branch ranks it.
    assert explanation["vision"] == 0.0 and explanation["alpha"] == 0.0


def test_the_subset_filter_ranks_only_the_named_classes_renormalised(client, bundle_v1, manifest):
    n = manifest["head"]["num_classes"]
    for _, data in _images(bundle_v1, 3):
        full = _ok(_classify(client, data, top_k=n, explain="true"))["predictions"]
        subset = [full[-1]["label"], full[1]["label"]]
        got = _ok(client.post("/v1/classify", files={"file": ("i.png", data)}, params={"classes": subset, "top_k": 5}))
        labels = [p["label"] for p in got["predictions"]]
        assert sorted(labels) == sorted(subset)  # top_k capped at the subset's size
        by_label = {p["label"]: p for p in full}
        alpha = manifest["head"]["alpha"]
        vis = sum(by_label[c]["explanation"]["vision"] for c in subset)
        lin = sum(by_label[c]["explanation"]["language"] for c in subset)
        for p in got["predictions"]:
            e = by_label[p["label"]]["explanation"]
            expected = alpha * e["vision"] / vis + (1 - alpha) * e["language"] / lin
            assert p["score"] == pytest.approx(expected, abs=1e-5)
        assert sum(p["score"] for p in got["predictions"]) == pytest.approx(1.0, abs=1e-5)
        assert labels == [c for c in sorted(subset, key=lambda c: -by_label[c]["score"])]


def test_ad_hoc_labels_are_ranked_zero_shot_through_the_text_encoder(client, bundle_v1):
    bundle = load_bundle(bundle_v1)
    images = _images(bundle_v1, 2)
    labels = ["a photo of a cat", "an orange thing", "a purple thing", "a tractor"]
    text = TextEncoder(bundle.text_encoder_path, bundle.tokenizer(), "cpu", 1)
    directions = np.stack([unit_mean(text.encode_texts(name_prompts(label))) for label in labels])
    encoder = ImageEncoder(bundle.image_encoder_path, "cpu", 1)
    import io

    for _, data in images:
        feature = encoder.encode(preprocess_batch([Image.open(io.BytesIO(data)).convert("RGB")], bundle.preprocess))[0]
        logits = bundle.head.logit_scale * directions @ (feature / np.linalg.norm(feature))
        expected = np.exp(logits - logits.max())
        expected /= expected.sum()
        body = _ok(client.post("/v1/classify", files={"file": ("i.png", data)}, params={"labels": labels}))
        got = {p["label"]: p["score"] for p in body["predictions"]}
        assert all(p["class_id"] is None for p in body["predictions"])
        assert set(got) == set(labels)
        for label, score in zip(labels, expected):
            assert got[label] == pytest.approx(float(score), abs=1e-4)
        assert [p["label"] for p in body["predictions"]] == [labels[i] for i in np.argsort(-expected, kind="stable")]
    # Nothing was added to the class table.
    assert not any(name in _anchors(client) for name in labels)


def test_json_base64_gets_the_same_answer_as_multipart(client, bundle_v1):
    images = _images(bundle_v1, 3)
    for _, data in images:
        multipart = _ok(_classify(client, data, top_k=3, explain="true"))
        b64 = base64.b64encode(data).decode()
        body = _ok(client.post("/v1/classify", json={"image": b64, "top_k": 3, "explain": True}))
        _same(body["predictions"], multipart["predictions"])
        data_url = _ok(client.post("/v1/classify", json={"image": f"data:image/png;base64,{b64}", "top_k": 3}))
        assert [p["class_id"] for p in data_url["predictions"]] == [p["class_id"] for p in multipart["predictions"]]
    batch = {
        "images": [
            {"data": base64.b64encode(images[0][1]).decode(), "filename": "a.png"},
            {"data": "%%% not base64 %%%", "filename": "b.png"},
            {"data": base64.b64encode(b"plain text").decode()},
            {"data": base64.b64encode(images[1][1]).decode()},
        ],
        "top_k": 2,
    }
    results = _ok(client.post("/v1/classify/batch", json=batch))["results"]
    assert [r["status"] for r in results] == [200, 422, 400, 200]
    assert [r["filename"] for r in results] == ["a.png", "b.png", None, None]
    assert results[1]["error"]["code"] == "invalid" and "images[1].data" in results[1]["error"]["message"]
    assert results[2]["error"]["code"] == "bad_image"
    for r, (_, data) in zip([results[0], results[3]], [images[0], images[1]]):
        single = _ok(_classify(client, data, top_k=2))
        _same(r["predictions"], single["predictions"])


@pytest.mark.parametrize(
    "request_kwargs,status,code,words",
    [
        ({"params": {"classes": "no such class"}}, 422, "invalid", "not served"),
        ({"params": {"classes": "class 1", "labels": "a cat"}}, 422, "invalid", "not both"),
        ({"params": {"labels": ["  "]}}, 422, "invalid", "labels[0]"),
        ({"params": {"labels": ["x" * 201]}}, 422, "invalid", "labels[0]"),
        ({"params": {"labels": ["a", "a"]}}, 422, "invalid", "once"),
        ({"params": {"labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}}, 422, "invalid", "labels"),
        ({"params": {"explain": "maybe"}}, 422, "invalid", "explain"),
        ({"json": {"image": "!!!"}}, 422, "invalid", "base64"),
        ({"json": {"image": 5}}, 422, "invalid", "image"),
        ({"json": {"picture": "aGk="}}, 422, "invalid", "image"),
        ({"json": {"image": "aGk=", "top_k": 0}}, 422, "invalid", "top_k"),
        ({"json": {"image": "aGk=", "top_k": 10_000}}, 422, "invalid", "top_k"),
        ({"json": {"image": "aGk=", "labels": []}}, 422, "invalid", "labels"),
        # The body holds the types the document states: no bool for an integer, no number for a bool.
        ({"json": {"image": "aGk=", "top_k": True}}, 422, "invalid", "top_k"),
        ({"json": {"image": "aGk=", "explain": 0.0}}, 422, "invalid", "explain"),
        # A query list the JSON body replaces must still be one the query could give (the document's item rules).
        (
            {"json": {"image": "aGk=", "labels": ["a cat"]}, "params": {"labels": ["  "]}},
            422,
            "invalid",
            "query.labels[0]",
        ),
        (
            {"json": {"image": "aGk=", "classes": ["class 1"]}, "params": {"classes": [""]}},
            422,
            "invalid",
            "query.classes",
        ),
        ({"json": {"image": base64.b64encode(b"hello").decode()}}, 400, "bad_image", ""),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid", "JSON"),
        ({"json": {"image": base64.b64encode(bytes(MAX_IMAGE_BYTES + 10)).decode()}}, 413, "too_large", ""),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_type", "base64"),
    ],
)
def test_bad_single_requests_are_json_errors(client, bundle_v1, request_kwargs, status, code, words):
    kwargs = dict(request_kwargs)
    if "json" not in kwargs and "content" not in kwargs:
        kwargs["files"] = {"file": ("i.png", _images(bundle_v1, 1)[0][1])}
    message = _error(client.post("/v1/classify", **kwargs), status, code)
    assert words in message


@pytest.mark.parametrize(
    "body,status,words",
    [
        ({"images": []}, 422, "images"),
        ({"images": [{"data": "aGk="}] * 5}, 413, "at most 4"),
        ({"images": [{"nodata": "aGk="}]}, 422, "data"),
        ({"images": [{"data": "aGk="}], "classes": ["nope"]}, 422, "not served"),
        ({"images": [{"data": "0"}], "top_k": True, "explain": 0.0}, 422, "top_k"),
    ],
)
def test_bad_batch_requests_are_json_errors(client, body, status, words):
    message = _error(client.post("/v1/classify/batch", json=body), status, "invalid" if status == 422 else "too_large")
    assert words in message


def test_a_batch_whose_images_all_fail_is_still_refused_for_its_options(client):
    # No image reaches the model here, so nothing downstream would look at the options: they are checked for the
    # request itself (found by schema fuzzing: a 200 with per-image errors for a class name over the limit).
    undecodable = {"images": [{"data": "%%% not base64 %%%"}, {"data": "%%%"}]}
    too_long = client.post("/v1/classify/batch", json=undecodable, params={"classes": ["x" * 201]})
    assert "classes[0]" in _error(too_long, 422, "invalid")
    unserved = client.post("/v1/classify/batch", json={**undecodable, "classes": ["no such class"]})
    assert "not served" in _error(unserved, 422, "invalid")
    both = client.post("/v1/classify/batch", json={**undecodable, "labels": ["a cat"]}, params={"classes": ["class 1"]})
    assert "not both" in _error(both, 422, "invalid")
