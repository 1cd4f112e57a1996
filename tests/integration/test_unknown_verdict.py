"""The `unknown` verdict against a real `vlltr serve` on the committed bundle `bundle_v1` (no torch), which was
exported before the verdict existed: every answer carries `confidence` (the top class's calibrated score) and,
with no threshold in the bundle and none set, `unknown: null`; `VLLTR_UNKNOWN_THRESHOLD` supplies one, and the
score it is compared with is the default `vision_energy` (logsumexp of the vision logits), recomputed here with
the runtime.
The trained bundle's own fitted threshold is tested in tests/e2e/test_unknown_images.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.predictor import BundlePredictor, probabilities_and_nearness


def _images(bundle: Path, n: int) -> list[tuple[str, bytes]]:
    data = bundle.parent / "run" / "data"
    names = [line.split()[0] for line in (data / "test.txt").read_text().splitlines()[:n] if line]
    return [(Path(name).name, (data / name).read_bytes()) for name in names]


def _start(server_factory, bundle: Path, workdir: Path, threshold: str | None):
    env = {"VLLTR_CLASS_STORE": str(workdir / "classes.json")}
    if threshold is not None:
        env["VLLTR_UNKNOWN_THRESHOLD"] = threshold
    return server_factory(env=env, args=["--bundle", str(bundle)], workdir=workdir)


@pytest.fixture(scope="module")
def plain_url(bundle_v1, server_factory, tmp_path_factory):
    srv = _start(server_factory, bundle_v1, tmp_path_factory.mktemp("unknown-plain"), None)
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def strict_url(bundle_v1, server_factory, tmp_path_factory):
    # Far above any logsumexp of this bundle's vision logits (a few units): every image is unknown.
    srv = _start(server_factory, bundle_v1, tmp_path_factory.mktemp("unknown-strict"), "1e6")
    yield srv.url
    srv.stop()


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _energies(bundle: Path, images: list[tuple[str, bytes]]) -> np.ndarray:
    b = load_bundle(bundle)
    predictor = BundlePredictor(b)
    feats = predictor.image_features([Image.open(io.BytesIO(data)).convert("RGB") for _, data in images])
    return probabilities_and_nearness(feats, b.head, b.class_table(), b.log_prior, b.calibration, b.alpha)[1].energy


def test_an_old_bundle_answers_a_confidence_and_no_verdict(plain_url, bundle_v1):
    assert load_bundle(bundle_v1).calibration.unknown is None
    images = _images(bundle_v1, 3)
    with httpx.Client(base_url=plain_url, timeout=60) as client:
        for _, data in images:
            for params in ({}, {"explain": "true"}):
                body = _ok(client.post("/v1/classify", files={"file": ("i.png", data)}, params=params))
                assert body["confidence"] == pytest.approx(body["predictions"][0]["score"])
                assert body["unknown"] is None and body["unknown_score"] is None
        batch = _ok(client.post("/v1/classify/batch", files=[("files", (n, d)) for n, d in images]))
        assert _ok(client.get("/v1/model"))["unknown_rule"] is None
    for item in batch["results"]:
        assert item["confidence"] == pytest.approx(item["predictions"][0]["score"])
        assert item["unknown"] is None and item["unknown_score"] is None


def test_the_setting_supplies_a_threshold_on_the_vision_energy(strict_url, bundle_v1):
    images = _images(bundle_v1, 4)
    energies = _energies(bundle_v1, images)
    with httpx.Client(base_url=strict_url, timeout=60) as client:
        singles = [_ok(client.post("/v1/classify", files={"file": (n, d)})) for n, d in images]
        explained = _ok(client.post("/v1/classify", files={"file": images[0]}, params={"explain": "true"}))
        other = singles[0]["predictions"][1]["label"]
        subset = _ok(client.post("/v1/classify", files={"file": images[0]}, params={"classes": other}))
        labels = _ok(client.post("/v1/classify", files={"file": images[0]}, params=[("labels", "a"), ("labels", "b")]))
        batch = _ok(client.post("/v1/classify/batch", files=[("files", (n, d)) for n, d in images]))
        rule = _ok(client.get("/v1/model"))["unknown_rule"]
    expected = {"score": "vision_energy", "threshold": 1e6, "source": "setting", "fitted_on": None, "keep": None}
    assert rule == {**expected, "components": None}
    assert len({round(e, 4) for e in energies.tolist()}) == len(images)  # the images differ: a real comparison
    for body, energy in zip(singles, energies):
        assert body["unknown"] is True
        assert body["unknown_score"] == pytest.approx(float(energy), abs=1e-4)
    for item, body in zip(batch["results"], singles):
        assert item["unknown"] is True and item["unknown_score"] == pytest.approx(body["unknown_score"], abs=1e-4)
    # Options score one image at a time, to the same verdict; a subset is still judged against every class.
    assert explained["unknown"] is True and explained["unknown_score"] == pytest.approx(float(energies[0]), abs=1e-4)
    assert subset["unknown_score"] == pytest.approx(float(energies[0]), abs=1e-4)
    assert subset["confidence"] == pytest.approx(1.0)  # one class of the subset holds all its probability
    # Ad-hoc labels are not the classes the threshold speaks of: no verdict, the zero-shot top score.
    assert labels["unknown"] is None and labels["confidence"] == pytest.approx(labels["predictions"][0]["score"])


def test_a_bad_setting_stops_the_service_with_a_clear_message(bundle_v1, tmp_path):
    env = {**os.environ, "VLLTR_UNKNOWN_THRESHOLD": "nan", "VLLTR_CLASS_STORE": str(tmp_path / "c.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "vlltr.cli", "serve", "--bundle", str(bundle_v1), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown_threshold" in (proc.stderr + proc.stdout).lower()
