"""The `unknown` verdict on a trained model, over HTTP: Shapes-LT trained with the tiny config (shortened: about
three minutes on two cores), its threshold fitted by `vlltr train` on the validation split and stored in the
bundle. Images far from every class (uniform noise, another benchmark's digits) come back `unknown`; the
trained classes' own test images mostly do not; `VLLTR_UNKNOWN_THRESHOLD` overrides the bundle's threshold.

The bounds are loose on purpose: this short run is a weak model, whose scores flag noise and another dataset
unevenly (docs/benchmarks/unknown.md, `python -m bench.unknown`); the bundle's rule is the default `typicality`,
which flags what any of its scores finds far."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

SHORT = ["stage1.epochs=3", "stage2.epochs=2", "eval.split=val"]
N = 40


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Shapes-LT bundle trained by this version's pipeline; Digits-LT written next to it."""
    from vlltr.training.benchmarks import write_benchmark
    from vlltr.training.config import load_config
    from vlltr.training.export import export_bundle
    from vlltr.training.pipeline import run_training

    root = tmp_path_factory.mktemp("unknown-shapes")
    write_benchmark("shapes-lt", root / "shapes", seed=0)
    write_benchmark("digits-lt", root / "digits", seed=0)
    cfg = load_config("shapes-lt-tiny", [f"data.root={root / 'shapes'}", *SHORT])
    run_training(cfg, root / "run")
    return export_bundle(root / "run", root / "bundle")


def _server(factory, bundle: Path, workdir: Path, env: dict[str, str]):
    return factory(
        env={"VLLTR_CLASS_STORE": str(workdir / "classes.json"), **env}, args=["--bundle", str(bundle)], workdir=workdir
    )


@pytest.fixture(scope="module")
def url(shapes_bundle, server_factory, tmp_path_factory):
    srv = _server(server_factory, shapes_bundle, tmp_path_factory.mktemp("unknown-served"), {})
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def lenient_url(shapes_bundle, server_factory, tmp_path_factory):
    # Below any score the bundle's rule can give: the setting lets every image through.
    env = {"VLLTR_UNKNOWN_THRESHOLD": "-1e6"}
    srv = _server(server_factory, shapes_bundle, tmp_path_factory.mktemp("unknown-lenient"), env)
    yield srv.url
    srv.stop()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise(n: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    return [_png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))) for _ in range(n)]


def _test_images(data: Path, n: int, *, trained: set[int] | None = None) -> list[bytes]:
    lines = [line.rsplit(maxsplit=1) for line in (data / "test.txt").read_text().splitlines() if line]
    picked = [path for path, label in lines if trained is None or int(label) in trained]
    step = max(1, len(picked) // n)  # spread over the split (it is sorted by class)
    return [(data / path).read_bytes() for path in picked[::step][:n]]


def _trained(data: Path) -> set[int]:
    return set(json.loads((data / "meta.json").read_text())["trained_classes"])


def _answers(base: str, images: list[bytes]) -> list[dict]:
    out = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for lo in range(0, len(images), 8):
            files = [("files", (f"{lo + i}.png", data)) for i, data in enumerate(images[lo : lo + 8])]
            r = client.post("/v1/classify/batch", files=files)
            assert r.status_code == 200, r.text
            out.extend(r.json()["results"])
    for item in out:
        assert item["status"] == 200, item
        assert isinstance(item["unknown"], bool) and isinstance(item["unknown_score"], float)
        assert item["confidence"] == pytest.approx(item["predictions"][0]["score"])
    return out


def _flagged(items: list[dict]) -> float:
    return sum(item["unknown"] for item in items) / len(items)


def test_the_bundle_carries_a_threshold_fitted_on_validation_data(shapes_bundle):
    manifest = json.loads((shapes_bundle / "manifest.json").read_text())
    rule = manifest["calibration"]["unknown"]
    assert rule["score"] == "typicality" and rule["fitted_on"] == "val" and rule["keep"] == 0.95
    assert list(rule["components"]) == ["vision_energy", "mahalanobis"]
    assert all(len(q) == 101 for q in rule["components"].values()) and 0 < rule["threshold"] < 0.05
    assert "prototypes.npz" in manifest["files"]  # the mahalanobis score's class statistics


def test_images_far_from_every_class_are_unknown_and_trained_ones_mostly_not(url, shapes_bundle):
    root = shapes_bundle.parent
    trained = _answers(url, _test_images(root / "shapes", N, trained=_trained(root / "shapes")))
    noise = _answers(url, _noise(N))
    digits = _answers(url, _test_images(root / "digits", N))
    assert _flagged(trained) <= 0.2, [i["unknown_score"] for i in trained]
    assert _flagged(noise) >= 0.8, [i["unknown_score"] for i in noise]
    assert _flagged(digits) >= 0.6, [i["unknown_score"] for i in digits]
    # One image alone gets the verdict it got in a batch.
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/classify", files={"file": ("noise.png", _noise(1)[0])})
    assert r.status_code == 200, r.text
    assert r.json()["unknown"] is noise[0]["unknown"]
    with httpx.Client(base_url=url, timeout=60) as client:
        served = client.get("/v1/model").json()["unknown_rule"]
    fitted = json.loads((shapes_bundle / "manifest.json").read_text())["calibration"]["unknown"]
    assert served == {**fitted, "components": list(fitted["components"]), "source": "bundle"}
    assert r.json()["unknown_score"] == pytest.approx(noise[0]["unknown_score"], abs=1e-4)


def test_the_setting_overrides_the_bundle_threshold(url, lenient_url):
    images = _noise(8)
    strict, lenient = _answers(url, images), _answers(lenient_url, images)
    assert _flagged(strict) >= 0.5
    assert not any(item["unknown"] for item in lenient)
    for a, b in zip(strict, lenient):  # the same score, judged against another threshold
        assert a["unknown_score"] == pytest.approx(b["unknown_score"], abs=1e-4)
