"""A bundle whose manifest is the first format-1 exporter's serves through a real `vlltr serve`."""

from __future__ import annotations

import shutil

import httpx

from support.manifests import first_exporter_manifest, rewrite_manifest
from vlltr.model.runtime.manifest import read_manifest


def test_a_bundle_of_the_previous_exporter_serves(service_bundle, server_factory, tmp_path):
    old = tmp_path / "old-bundle"
    shutil.copytree(service_bundle, old)
    rewrite_manifest(old, first_exporter_manifest)
    (tmp_path / "srv").mkdir()
    srv = server_factory(env={}, args=["--bundle", str(old)], workdir=tmp_path / "srv")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            info = client.get("/v1/model").json()
            assert info["bundle_id"] == read_manifest(old).bundle_id and info["dataset"] is not None
            data = service_bundle.parent / "run" / "data"
            first = (data / "test.txt").read_text().split()[0]
            r = client.post("/v1/classify", files={"file": ("a.png", (data / first).read_bytes())})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 5
            tiers = {c["tier"] for c in client.get("/v1/classes").json()["classes"]}
            assert tiers <= {"head", "medium", "tail"}
    finally:
        srv.stop()
