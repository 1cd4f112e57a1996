"""The app factory in-process: the lifespan loads the bundle itself, and the last-resort 500 handler answers
an unexpected exception with a generic envelope and a request id (no input reaches it; a test route does).
On the committed bundle the previous version exported (no torch)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from vlltr.service.app import create_app
from vlltr.service.settings import Settings


def test_lifespan_loads_serves_and_hides_internals_of_unexpected_errors(bundle_v1, tmp_path):
    settings = Settings(bundle=bundle_v1, cache_dir=tmp_path, max_wait_ms=1)
    app = create_app(settings)

    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        r = client.get("/test-only/boom", headers={"X-Request-ID": "req-42"})
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal", "message": "internal error (request id req-42)"}}
        assert "secret" not in r.text
        assert r.headers["x-request-id"] == "req-42"
        assert client.get("/healthz").status_code == 200
        png = (bundle_v1.parent / "run" / "data" / "test.txt").read_text().split()[0]
        data = (bundle_v1.parent / "run" / "data" / png).read_bytes()
        assert client.post("/v1/classify", files={"file": ("a.png", data)}).status_code == 200
        metrics = client.get("/metrics").text
        assert 'route="/test-only/boom",status="500"' in metrics
        assert 'route="/v1/classify",status="200"' in metrics
