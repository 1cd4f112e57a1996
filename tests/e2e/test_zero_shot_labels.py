"""Ad-hoc labels on a trained model: the demo bundle's own classes given as free text in the request rank its
test images zero-shot (through the bundle's text encoder and the class-name prompt templates) far above
chance, without adding a class; the class table's own answer stays what it was."""

from __future__ import annotations

import httpx
import pytest

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def server(demo_bundle, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zero-shot")
    env = {"VLLTR_CLASS_STORE": str(workdir / "classes.json")}
    srv = server_factory(env=env, args=["--bundle", str(demo_bundle)], workdir=workdir)
    yield srv
    srv.stop()


def test_the_right_free_text_label_wins_far_above_chance(server, demo_bundle):
    data = demo_bundle.parent / "data"
    lines = [line.split() for line in (data / "test.txt").read_text().splitlines() if line]
    # Every class, the same number of images each (the test split is balanced; take its first 10 per class).
    per_class: dict[int, list[str]] = {}
    for path, label in lines:
        per_class.setdefault(int(label), []).append(path)
    labels = [f"handwritten {w}" for w in WORDS]  # free text, not the class names ("digit three")
    right = total = 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        classes_before = client.get("/v1/classes").json()["num_added"]
        for label, paths in sorted(per_class.items()):
            for path in paths[:10]:
                files = {"file": (path, (data / path).read_bytes())}
                r = client.post("/v1/classify", files=files, params={"labels": labels, "top_k": 1})
                assert r.status_code == 200, r.text
                (best,) = r.json()["predictions"]
                assert best["class_id"] is None
                right += best["label"] == labels[label]
                total += 1
        assert client.get("/v1/classes").json()["num_added"] == classes_before  # nothing was added
    # Chance is 1 in 10; the tiny model trained for a minute gets about 4 in 10 (measured: 0.45 on 200 images).
    assert right / total >= 0.25, (right, total)
